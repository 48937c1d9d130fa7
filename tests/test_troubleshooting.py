"""docs/TROUBLESHOOTING.md keeps up with the code: every error or warning the agent can
log, and every error message it raises, has its fixed text in the document.

The check reads the modules the agent runs (``edge_agent/agent`` and the protocol layer
it stands on; not edge-ctl, not the bridge), takes the literal
text of each message up to its first placeholder, and looks for it in the document.
Messages that start with a placeholder (``"%s (retrying in ...)"``) carry another
message, which is checked where it is made.
"""

from __future__ import annotations

import ast
import re

from tests.support import REPO_ROOT

PACKAGE = REPO_ROOT / "edge_agent"
# what the agent runs: its own package and the protocol layer under it
AGENT_CODE = (PACKAGE / "agent", PACKAGE / "protocol")
# modules outside those packages whose errors the agent reports
AGENT_FILES = (PACKAGE / "files.py",)
DOC = REPO_ROOT / "docs" / "TROUBLESHOOTING.md"
LEVELS = {"error", "warning", "exception", "critical"}
ERRORS = {"ConfigError", "TagError", "RunConfigError", "DockerUnavailable",
          "DockerOperationError", "RegistryError", "ManifestUnknown", "StorageError",
          "MqttConnectError", "InsufficientSpace"}
# Shorter fixed texts ("pull ", "container ") say too little to look for.
MIN_CHARS = 10


def literal_parts(node: ast.expr) -> list[str] | None:
    """The message's fixed texts between its placeholders (%s, {...})."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str)
                       else "\0" for v in node.values)
    else:
        return None
    return [part.strip() for part in re.split(r"%[-0-9.]*[sdfr]|\0", text)]


def literal_prefix(node: ast.expr) -> str | None:
    """The message's fixed text before its first placeholder (%s, {...})."""
    parts = literal_parts(node)
    return parts[0] if parts is not None else None


def message_nodes() -> list[tuple[str, ast.expr]]:
    """Each message the agent logs or raises: where it is, and its text's expression."""
    found: list[tuple[str, ast.expr]] = []
    paths = sorted([*(p for package in AGENT_CODE for p in package.glob("*.py")), *AGENT_FILES])
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            text: ast.expr | None = None
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                    and node.args):
                if node.func.attr in LEVELS:
                    text = node.args[0]
                elif node.func.attr == "log" and len(node.args) > 1:
                    text = node.args[1]
            elif (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                  and isinstance(node.exc.func, ast.Name) and node.exc.func.id in ERRORS
                  and node.exc.args):
                text = node.exc.args[0]
            # A hint made by a function of its own (``permission_hint``) is part of messages.
            if (isinstance(node, ast.FunctionDef) and node.name.endswith("hint")):
                found.extend((f"{path.name}:{ret.lineno}", ret.value) for ret in ast.walk(node)
                             if isinstance(ret, ast.Return) and ret.value is not None)
            if text is not None:
                found.append((f"{path.parent.name}/{path.name}:{getattr(node, 'lineno', 0)}",
                              text))
    return found


def agent_messages() -> list[tuple[str, str]]:
    found = []
    for where, node in message_nodes():
        message = literal_prefix(node)
        if message and len(message) >= MIN_CHARS:
            found.append((where, message))
    return found


def agent_hints() -> list[tuple[str, str]]:
    """The fixed texts after a message's first placeholder: mostly what to do about it
    (``... (chown -R ...)``, ``...: is that a plaintext port?``)."""
    found = []
    for where, node in message_nodes():
        for part in (literal_parts(node) or [])[1:]:
            hint = part.strip(" ;:,")
            if len(hint) >= MIN_CHARS:
                found.append((where, hint))
    return found


def test_the_extraction_finds_the_messages() -> None:
    messages = {text for _, text in agent_messages()}
    # a few that must be there, or the extraction itself is broken
    assert "registry unreachable at" in messages
    assert "tag file ignored:" in messages
    assert "CONTAINER_IMAGE: required (an image repository, e.g. registry/app)" in messages
    assert len(messages) > 40


def test_every_agent_message_is_in_troubleshooting() -> None:
    doc = DOC.read_text()
    missing = [f"{where}: {text!r}" for where, text in agent_messages() if text not in doc]
    assert not missing, "add these to docs/TROUBLESHOOTING.md:\n" + "\n".join(missing)


def test_every_hint_is_in_troubleshooting() -> None:
    """A hint the agent gives after the details must be the one the document gives."""
    assert any("chown -R" in hint for _, hint in agent_hints())  # the extraction works
    doc = DOC.read_text()
    missing = [f"{where}: {text!r}" for where, text in agent_hints() if text not in doc]
    assert not missing, "add these to docs/TROUBLESHOOTING.md:\n" + "\n".join(missing)


def test_connection_errors_are_in_troubleshooting() -> None:
    """protocol.mqtt.describe_connect_error's texts are returned, not raised: checked here."""
    doc = DOC.read_text()
    function = next(node for node in ast.walk(ast.parse((PACKAGE / "protocol" / "mqtt.py").read_text()))
                    if isinstance(node, ast.FunctionDef)
                    and node.name == "describe_connect_error")
    texts = [literal_parts(node.value) for node in ast.walk(function)
             if isinstance(node, ast.Return) and node.value is not None]
    assert len(texts) >= 5
    for parts in texts:
        for text in (part.strip(" ;:,") for part in parts or []):
            if len(text) >= MIN_CHARS:
                assert text in doc, text


def test_doc_is_linked() -> None:
    assert "docs/TROUBLESHOOTING.md" in (REPO_ROOT / "README.md").read_text()

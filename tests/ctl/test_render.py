"""How edge-ctl shows device data (pure, no I/O): the terminal-safe text, the fleet
table, status, outcome and event texts; and, fuzzed, every path by which a device's
message reaches the terminal (the table, watch lines, the set-tag --wait report):
whatever a device publishes (any depth, size, encoding, type, number), collecting,
judging and showing it never raises, and what reaches the operator's terminal is
printable and bounded. The same payloads against a real broker and edge-ctl process:
test_commands.py."""

from __future__ import annotations

import io
import json
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.ctl.commands import collect_devices, watch_line
from edge_agent.ctl.render import (
    CELL_CHARS,
    ELLIPSIS,
    MAX_DETAILS,
    OUTCOMES,
    TEXT_CHARS,
    DeviceView,
    Printer,
    bar,
    date_time,
    describe_outcome,
    devices_table,
    printable,
    status_text,
    superseded_text,
)
from edge_agent.ctl.waiting import report_outcome, wait_for_tag
from edge_agent.protocol.events import CheckOutcome
from edge_agent.protocol.mqtt import Incoming
from edge_agent.protocol.timestamps import local_time
from edge_agent.protocol.topics import Topics
from tests.support.documents import settled_on
from tests.support.hostile import (
    FAR_TIMES,
    FORBIDDEN,
    HOSTILE_STRINGS,
    deep_json,
    hostile_events,
    hostile_state,
    wrong_types_state,
)

T = Topics("edge")
DEVICES = ("dev1", "dev-2", "x.y")
FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text as hostile as it gets: any code point (surrogates too), plus the dangerous ones often.
DANGEROUS = st.sampled_from([*"\x1b\r\n\t\x07\x08\x00\x7f\x85\x9b\u2028\u2029\u061c",
                             *"\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u00ad",
                             *"\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069",
                             *HOSTILE_STRINGS, *FAR_TIMES])
TEXT = st.lists(st.one_of(st.characters(), DANGEROUS), max_size=40).map("".join)
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
                    st.floats(allow_nan=False), st.sampled_from([1e308, -1e308, 5e-324]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A document with some of the agent's keys (holding anything) or anything at all."""
    return st.one_of(st.fixed_dictionaries({}, optional=fields), VALUES)


STATES = shaped({
    "device_id": VALUES, "ts": st.one_of(st.sampled_from(FAR_TIMES), VALUES),
    "desired": shaped({k: st.one_of(TEXT, VALUES) for k in ("tag", "source", "group",
                                                           "request_id")}),
    "running": shaped({k: st.one_of(TEXT, VALUES) for k in ("tag", "status", "health")}),
    "fallback": shaped({"active": st.one_of(st.booleans(), VALUES),
                        "requested_tag": VALUES, "reason": VALUES}),
    "update": shaped({"status": st.one_of(st.sampled_from(["idle", "pulling", "checking",
                                                           "available"]), VALUES),
                      "progress": st.one_of(NUMBERS, VALUES),
                      "last_check_at": st.one_of(st.sampled_from(FAR_TIMES), VALUES),
                      "last_error": VALUES}),
})
EVENTS = shaped({
    "event": st.one_of(st.sampled_from(["update_started", "pull_progress", "update_succeeded",
                                        "rolled_back", "fallback", "update_failed",
                                        "tag_superseded"]), VALUES),
    "request_id": st.one_of(st.just("r1"), VALUES), "tag": st.one_of(st.just("2.0"), VALUES),
    "new_tag": VALUES, "superseded_by": VALUES,
    "progress": st.one_of(NUMBERS, VALUES), "ts": st.one_of(st.sampled_from(FAR_TIMES), VALUES),
    "reason": VALUES, "from_tag": VALUES, "device_id": VALUES, "type": VALUES,
    "outcome": VALUES, "ok": VALUES, "error": VALUES,
})


def encoded(documents: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Payload bytes: the document as JSON (UTF-8 or not), numbers beyond any float,
    nesting beyond any limit, or just bytes."""
    def dumps(document: Any) -> str:
        return json.dumps(document, allow_nan=True)

    return st.one_of(
        documents.map(lambda d: dumps(d).encode("utf-8", "surrogatepass")),
        documents.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "replace")),
        documents.map(lambda d: dumps(d).encode("utf-16")),
        documents.map(lambda d: dumps(d).replace("1e+308", "1e999").encode()),
        st.integers(min_value=30, max_value=3000).map(deep_json),
        st.sampled_from([*hostile_events(), wrong_types_state("dev1"),
                         json.dumps(hostile_state("dev1", huge=True)).encode(),
                         b"\xff\xfe\x00", b"", b"null", b"[]", b"online\x1b[2J"]),
        st.binary(max_size=200),
    )


MESSAGES = st.builds(
    Incoming,
    topic=st.one_of(st.sampled_from([f(d) for d in DEVICES
                                     for f in (T.state, T.events, T.availability)]),
                    TEXT.map(lambda x: f"edge/devices/{x}/state"), TEXT),
    payload=st.one_of(encoded(STATES), encoded(EVENTS)),
    retained=st.booleans(),
)


# What the terminal must never get raw, stated here (not taken from edge-ctl) so that a
# change there cannot weaken the test: controls, format characters (bidi, zero-width),
# surrogates, private-use and unassigned code points, line and paragraph separators.
HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def hidden(text: str) -> list[str]:
    """The characters of ``text`` that must never reach a terminal (newline separates
    the lines edge-ctl itself prints)."""
    return [f"U+{ord(c):04X}" for c in text if c != "\n" and (
        c in FORBIDDEN or unicodedata.category(c) in HIDDEN)]


def assert_terminal_safe(text: str) -> None:
    assert not hidden(text), (hidden(text), text[:500])


# -- printable ------------------------------------------------------------------------------
@FUZZ
@given(value=st.one_of(TEXT, VALUES), limit=st.integers(min_value=0, max_value=400))
def test_printable_is_safe_bounded_and_idempotent(value: Any, limit: int) -> None:
    shown = printable(value, limit)
    assert len(shown) <= limit
    assert_terminal_safe(shown)
    assert printable(shown, limit) == shown


@FUZZ
@given(text=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
def test_printable_text_passes_unchanged(text: str) -> None:
    assert printable(text, 80) == text


def test_printable_escapes_visibly_and_cuts_with_an_ellipsis() -> None:
    assert printable("a\x1b[2Jb\r\nc\t\x9b") == "a\\x1b[2Jb\\r\\nc\\t\\x9b"
    assert printable("\u202eevil\u2066\u200b\ufeff") == "\\u202eevil\\u2066\\u200b\\ufeff"
    assert printable("\U000e0001tag") == "\\U000e0001tag"  # a format character, not in the BMP
    assert printable("caf\u00e9 \u65e5\u672c") == "caf\u00e9 \u65e5\u672c"  # letters stay
    assert printable("x" * 100, 10) == "x" * 9 + ELLIPSIS
    assert printable("\x1b" * 10, 10) == "\\x1b\\x1b" + ELLIPSIS  # never half an escape
    assert printable({"a": [1, None]}) == '{"a":[1,null]}'
    assert printable(7) == "7" and printable(10**5000) == "?"  # beyond int-to-str's limit


# -- collecting and showing the fleet -----------------------------------------------------
@FUZZ
@given(messages=st.lists(MESSAGES, max_size=8))
def test_any_retained_messages_make_a_safe_table(messages: list[Incoming]) -> None:
    devices = collect_devices(T, messages)
    views = sorted(devices.values(), key=lambda v: v.device_id)
    table = devices_table(views)
    assert_terminal_safe(table)
    lines = table.splitlines()
    assert len(lines) == 1 + len(views)  # one row per device: nothing forged
    for line, view in zip(lines[1:], views, strict=True):
        assert line.startswith(printable(view.device_id, CELL_CHARS))
        # 7 short cells, a last-check time and the note: bounded whatever the device sent
        assert len(line) <= 7 * (CELL_CHARS + 2) + 19 + TEXT_CHARS + 64 + 40
    for view in views:
        assert view.state is None or isinstance(view.state, dict)
        assert (view.state is None) or view.state_error is None
        json.dumps(view.to_json(), ensure_ascii=True)  # --json can always show it


@FUZZ
@given(state=STATES)
def test_status_text_of_any_state_is_safe(state: Any) -> None:
    document = state if isinstance(state, dict) else {"update": state}
    text = status_text(document)
    assert_terminal_safe(text)
    assert len(text) <= 2 * CELL_CHARS + 40


@FUZZ
@given(answer=EVENTS)
def test_any_answer_to_check_is_described_safely(answer: Any) -> None:
    if not isinstance(answer, dict):
        answer = {"outcome": answer}
    text = describe_outcome(answer)
    assert_terminal_safe(text)
    assert len(text) <= 2 * CELL_CHARS + 80


@FUZZ
@given(percent=st.floats())
def test_bar_takes_any_number(percent: float) -> None:
    assert len(bar(percent)) == 22


# -- watch and set-tag --wait -------------------------------------------------------------
@FUZZ
@given(messages=st.lists(MESSAGES, max_size=8), as_json=st.booleans())
def test_watch_shows_any_message_safely(messages: list[Incoming], as_json: bool) -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(as_json, out, err)
    statuses: dict[str, str] = {}
    for message in messages:
        watch_line(T, message, statuses, printer)
    if as_json:
        for line in out.getvalue().splitlines():
            assert line.isascii()
            shown = json.loads(line)
            # the device is the one of the topic, whatever the payload claims
            assert shown["device_id"] in {T.device_of(m.topic) or "?" for m in messages}
            assert shown["type"] in ("availability", "status", "event")
    else:
        assert_terminal_safe(out.getvalue())
        for line in out.getvalue().splitlines():
            assert len(line) <= 20 + 3 * CELL_CHARS + (MAX_DETAILS + 1) * 3 * CELL_CHARS
    assert_terminal_safe(err.getvalue())


class Script:
    """What wait_for_tag reads of a Session: topics and these messages."""

    def __init__(self, messages: list[Incoming]) -> None:
        self.topics = T
        self.script = messages

    def messages(self, timeout_s: float | None) -> Iterator[Incoming]:
        yield from self.script


DEV1_MESSAGES = st.builds(
    Incoming, topic=st.sampled_from([T.state("dev1"), T.events("dev1"), T.availability("dev1")]),
    payload=st.one_of(encoded(STATES), encoded(EVENTS),
                      EVENTS.map(lambda e: json.dumps({**e, "request_id": "r1"}
                                                      if isinstance(e, dict) else e).encode())),
    retained=st.just(False))


@FUZZ
@given(messages=st.lists(DEV1_MESSAGES, max_size=8), as_json=st.booleans())
def test_set_tag_wait_reports_any_device_answer_safely(messages: list[Incoming],
                                                        as_json: bool) -> None:
    out, err = io.StringIO(), io.StringIO()
    printer = Printer(as_json, out, err)
    waited = wait_for_tag(Script(messages), "dev1", "2.0", "r1", 1.0, printer)
    code = report_outcome("dev1", "2.0", "r1", waited, 1.0, printer)
    assert code in (0, 1, 3)
    assert_terminal_safe(err.getvalue())
    if as_json:
        assert out.getvalue().isascii()
        json.loads(out.getvalue())
    else:
        assert_terminal_safe(out.getvalue())


def test_a_device_view_without_state_still_shows() -> None:
    table = devices_table([DeviceView("dev1", None, None, "state ignored: \x1b[2J")])
    assert table.splitlines()[1].split() == ["dev1", "?", "-", "-", "-", "-", "-", "state",
                                             "ignored:", "\\x1b[2J"]


def test_every_check_outcome_has_its_words() -> None:
    assert set(OUTCOMES) == set(CheckOutcome)
    for outcome in CheckOutcome:
        text = describe_outcome({"ok": True, "outcome": str(outcome), "tag": "2.0"})
        assert "2.0" in text and text != f"{outcome} (2.0)"  # words, not the raw outcome


def test_table_and_bar_formatting() -> None:
    state = {
        "device_id": "dev1",
        "desired": {"tag": "2.0", "source": "device", "group": None, "request_id": "r"},
        "running": {"tag": "1.0", "status": "running", "health": "healthy"},
        "update": {"status": "pulling", "progress": 45.2,
                   "last_check_at": "2026-11-29T10:08:03.480Z", "last_error": None},
        "fallback": {"active": False},
    }
    table = devices_table([DeviceView("dev1", True, state), DeviceView("dev2", None, None)])
    lines = table.splitlines()
    assert lines[1].split()[:7] == ["dev1", "yes", "1.0", "2.0", "(device)", "pulling", "45%"]
    assert " ".join(lines[1].split()[8:10]) == local_time("2026-11-29T10:08:03.480Z",
                                                          with_date=True)
    assert lines[2].split()[:3] == ["dev2", "?", "-"]
    assert bar(0) == "[" + "." * 20 + "]"
    assert bar(50) == "[" + "#" * 10 + "." * 10 + "]"
    assert bar(100) == "[" + "#" * 20 + "]"


@pytest.mark.parametrize(("value", "shown"), [
    ("2026-11-29T10:08:03Z", local_time("2026-11-29T10:08:03Z", with_date=True)),
    ("2026-11-29 10:08:03", "2026-11-29 10:08:03"),  # no offset: no timestamp, shown as sent
    ("9999-12-31T23:59:59-23:59", "9999-12-31T23:59:59-23:59"),  # beyond 9000: the same
    ("\x1b[2J", "\\x1b[2J"),
    (None, "-"), (17, "-"),
])
def test_a_time_field_is_local_time_or_what_the_device_sent(value: Any, shown: str) -> None:
    assert date_time(value) == shown


def test_a_superseded_request_in_words() -> None:
    assert superseded_text({"new_tag": "3.0", "superseded_by": "r2"}) == \
        "replaced by 3.0 (request r2) before it was applied"
    assert superseded_text({"new_tag": "3.0"}) == "replaced by 3.0 before it was applied"
    assert superseded_text({"new_tag": None}) == "cleared before it was applied"
    assert superseded_text({"new_tag": ["x"], "superseded_by": "\x1b[2J"}) == \
        "replaced by ? (request \\x1b[2J) before it was applied"


@FUZZ
@given(event=st.dictionaries(st.sampled_from(["new_tag", "superseded_by", "tag"]), VALUES))
def test_any_superseded_event_is_described_safely(event: dict[str, Any]) -> None:
    text = superseded_text(event)
    assert_terminal_safe(text)
    assert len(text) <= 2 * CELL_CHARS + 60


def test_a_device_tag_that_shadows_the_fleet_tag_is_shown() -> None:
    """A device tag (a mistyped one too) wins over group and fleet tags until cleared:
    ``edge-ctl devices`` says so instead of leaving the operator to wonder."""
    def retained(topic: str, body: Any) -> Incoming:
        return Incoming(topic, body if isinstance(body, bytes) else json.dumps(body).encode(),
                        True)

    own = {"tag": "9.9", "source": "device", "group": None, "request_id": None}
    follows = {"tag": "3.0", "source": "fleet", "group": None, "request_id": None}
    messages = [retained(T.fleet_tag, b"3.0"),
                retained(T.state("dev1"), settled_on("latest", desired=own)),
                retained(T.state("dev2"), settled_on("3.0", desired=follows))]
    devices = collect_devices(T, messages)
    rows = {line.split()[0]: line for line in devices_table(list(devices.values())).splitlines()}
    assert "its device tag shadows the fleet tag 3.0" in rows["dev1"], rows
    assert "edge-ctl clear-tag --device dev1" in rows["dev1"]
    assert "shadows" not in rows["dev2"] and "device tag" not in rows["dev2"]
    assert devices["dev1"].to_json()["shadows"] == {"scope": "fleet", "group": None,
                                                    "tag": "3.0"}
    # no fleet tag: still said that the device's own tag wins
    alone = collect_devices(T, messages[1:2])
    assert "wins over group and fleet tags" in devices_table(list(alone.values()))


def test_a_device_tag_that_shadows_its_group_tag_is_shown() -> None:
    """The group the device lists first (its DEVICE_GROUPS, in its state) that has a tag
    is what it would follow: that one is named, not the fleet's; the same tag shadows
    nothing; a group tag the agents would reject changes nothing."""
    def retained(topic: str, body: Any) -> Incoming:
        return Incoming(topic, body if isinstance(body, bytes) else json.dumps(body).encode(),
                        True)

    own = {"tag": "9.9", "source": "device", "group": None, "request_id": None}
    messages = [retained(T.fleet_tag, b"3.0"),
                retained(T.group_tag("line-2"), b"2.5"),
                retained(T.group_tag("line-1"), {"tag": "2.0", "request_id": "r1"}),
                retained(T.group_tag("other"), b"8.0"),
                retained(T.group_tag("line-3"), b"bad tag!"),
                retained(T.state("dev1"), {**settled_on("latest", desired=own),
                                           "groups": ["line-3", "line-1", "line-2"]}),
                retained(T.state("dev2"), {**settled_on("2.0", desired={**own, "tag": "2.0"}),
                                           "groups": ["line-1"]})]
    devices = collect_devices(T, messages)
    assert devices["dev1"].shadows == {"scope": "group", "group": "line-1", "tag": "2.0"}
    assert devices["dev2"].shadows is None  # its own tag is the group's
    rows = {line.split()[0]: line for line in devices_table(list(devices.values())).splitlines()}
    assert "its device tag shadows the group line-1 tag 2.0" in rows["dev1"], rows

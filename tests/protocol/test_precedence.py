"""Which devices a group or fleet tag reaches, and which tag a device tag shadows
(edge_agent/protocol/precedence.py): pure, from checked state documents."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edge_agent.protocol.precedence import groups_of, in_scope, repositories, shadowed


def state(source: str | None, tag: str = "9.9", *, groups: list[str] | None = None,
          group: str | None = None, image: str = "reg:5000/acme/app") -> dict[str, Any]:
    document: dict[str, Any] = {"image": image, "desired": {"tag": tag, "source": source,
                                                            "group": group}}
    if groups is not None:
        document["groups"] = groups
    return document


def test_a_device_tag_shadows_the_first_of_its_groups_with_a_tag() -> None:
    own = state("device", groups=["a", "b", "c"])
    assert shadowed(own, {"b": "2.0", "c": "3.0"}, "4.0") == {
        "scope": "group", "group": "b", "tag": "2.0"}
    assert shadowed(own, {"x": "2.0"}, "4.0") == {"scope": "fleet", "group": None, "tag": "4.0"}
    assert shadowed(own, {}, None) is None


def test_nothing_is_shadowed_without_a_device_tag_or_by_the_same_tag() -> None:
    assert shadowed(state("group", groups=["a"], group="a"), {"a": "2.0"}, "4.0") is None
    assert shadowed(state("fleet"), {}, "4.0") is None
    assert shadowed(state("device", "2.0", groups=["a"]), {"a": "2.0"}, "4.0") is None
    assert shadowed(None, {"a": "2.0"}, "4.0") is None


def test_an_agent_without_groups_in_its_state_is_in_the_group_it_follows() -> None:
    assert groups_of(state("group", group="a")) == ["a"]
    assert groups_of(state("device")) == []
    assert in_scope(state("group", group="a"), "a") and not in_scope(state("device"), "a")
    assert in_scope(state("device"), None)  # the fleet reaches everyone


def test_the_repositories_of_a_scope() -> None:
    fleet = [state("fleet", groups=["a"], image="r/one"), state("fleet", groups=[], image="r/two"),
             state("fleet", groups=["a", "b"], image="r/one"), None, {"image": 7}]
    assert repositories(fleet) == ["r/one", "r/two"]
    assert repositories(fleet, "b") == ["r/one"]
    assert repositories(fleet, "zzz") == []


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.sampled_from(["desired", "source", "tag", "groups",
                                                       "group", "image"]), inner, max_size=4),
                    max_leaves=12))
def test_any_document_gives_an_answer(document: Any) -> None:
    """The bridge checks documents first; edge-ctl passes what a device sent: nothing
    a device publishes makes these raise."""
    doc = document if isinstance(document, dict) else None
    found = shadowed(doc, {"a": "1"}, "2")
    assert found is None or found["tag"] in ("1", "2")
    assert all(isinstance(r, str) for r in repositories([doc], "a"))
    assert all(isinstance(g, str) for g in groups_of(doc))

"""NodeNames arrays recognised by their bytes: a repeat must parse exactly as a fresh body
would, and anything the cut cannot prove is the top-level array takes the ordinary parse."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extender.name_lists import NameListCache, split_names
from extender.protocol import BadRequest, parse_extender_args

POD = {"metadata": {"name": "p", "namespace": "ns", "uid": "u1"}}


def _body(names, pod=POD) -> bytes:
    return orjson.dumps({"Pod": pod, "Nodes": None, "NodeNames": names})  # Go's field order


def test_split_cuts_the_last_top_level_array() -> None:
    rest, raw = split_names(_body(["a", "b]", 'c"}']))
    assert orjson.loads(raw) == ["a", "b]", 'c"}']
    assert orjson.loads(rest) == {"Pod": POD, "Nodes": None, "NodeNames": None}


@pytest.mark.parametrize("body", [
    orjson.dumps({"NodeNames": ["a"], "Pod": POD}),  # not the last member
    orjson.dumps({"Pod": {**POD, "x": {"NodeNames": ["a"]}}, "Nodes": None}),  # nested
    _body(["a"]) + b"x",  # trailing bytes
    b'{"Pod": {}, "NodeNames": ["a"]}',  # not the compact encoding
])
def test_split_declines_what_it_cannot_prove(body) -> None:
    assert split_names(body) is None


def test_repeat_hands_back_the_same_list_with_the_new_pod() -> None:
    cache = NameListCache()
    names = [f"node-{i:05d}" for i in range(300)]
    first = parse_extender_args(_body(names), cache)
    other = {"metadata": {"name": "q", "namespace": "ns", "uid": "u2"}}
    second = parse_extender_args(_body(names, other), cache)
    assert first.node_names == names and second.node_names is first.node_names
    assert (second.name, second.uid, second.pod) == ("q", "u2", other)
    assert len(cache) == 1


def test_an_escaped_key_is_not_node_names() -> None:
    """`"ab\\"NodeNames":[...]` ends in the same bytes as the real key: the real NodeNames is
    null here, so there are no names, cached or not."""
    body = (b'{"Pod":' + orjson.dumps(POD) + b',"Nodes":null,"NodeNames":null,'
            b'"ab\\"NodeNames":["x"]}')
    cache = NameListCache()
    for _ in range(2):
        assert parse_extender_args(body, cache).node_names == []
    assert len(cache) == 0


def test_a_bad_name_is_refused_even_after_a_good_list() -> None:
    cache = NameListCache()
    parse_extender_args(_body(["n0", "n1"]), cache)
    for names, needle in ((["n0", 7], "NodeNames[1]"), (["n0", ""], "NodeNames[1]"),
                          ("n0", "NodeNames must be")):
        with pytest.raises(BadRequest, match=needle.replace("[", r"\[")):
            parse_extender_args(_body(names), cache)


def test_the_cache_keeps_the_most_recent_lists() -> None:
    cache = NameListCache(size=2)
    lists = [[f"a{i}", f"b{i}"] for i in range(3)]
    for names in lists:
        parse_extender_args(_body(names), cache)
    assert len(cache) == 2
    assert cache.get(orjson.dumps(lists[0])) is None
    assert cache.get(orjson.dumps(lists[2])) == lists[2]


_names = st.lists(st.text(min_size=0, max_size=6), max_size=6)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["NodeNames", "Nodes", "x", 'a"NodeNames']), inner,
                      max_size=3),
    max_leaves=8,
)


def _outcome(body: bytes, cache: NameListCache | None):
    try:
        a = parse_extender_args(body, cache)
    except BadRequest as e:
        return "400", str(e)
    return a.pod, a.node_names, a.nodes


@settings(max_examples=300, deadline=None)
@given(names=_names, extra=st.dictionaries(
    st.sampled_from(["Pod", "Nodes", "NodeNames", "x", 'ab"NodeNames']), _json, max_size=3),
    names_last=st.booleans(), tail=st.sampled_from([b"", b" ", b"\n", b"]", b"}"]))
def test_cached_parse_is_the_plain_parse(names, extra, names_last, tail) -> None:
    """Whatever the body (names with brackets and quotes, keys in any order, nested NodeNames,
    escaped look-alikes, trailing bytes), the cache changes nothing in the outcome: the same
    pod and names, or the same 400. Parsed twice, so the second goes through the cache."""
    args = {"Pod": POD, **extra}
    if names_last:
        args.pop("NodeNames", None)
        args["NodeNames"] = names
    body = orjson.dumps(args) + tail
    cache = NameListCache()
    plain = _outcome(body, None)
    assert _outcome(body, cache) == plain
    assert _outcome(body, cache) == plain

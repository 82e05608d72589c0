from hypothesis import given, settings
from hypothesis import strategies as st

from atommem_env.protocols import (Answer, Create, Delete, Read, SetQuery, SetScratchpad, Update, format_ops,
                                   parse_action)


def test_parses_every_op_and_ignores_free_text():
    action = ('I should store this. <create>Scott Derrickson is American.</create>\n<read>Ed Wood</read>'
              '<update id="3">Ed Wood was American.</update> <delete id="4"/> <delete id=5></delete>'
              '<scratchpad>plan</scratchpad><answer q="2">yes</answer><ANSWER>no</ANSWER>')
    result = parse_action(action)
    assert result.errors == []
    assert result.ops == [Create("Scott Derrickson is American."), Read("Ed Wood"),
                          Update("Ed Wood was American.", entry_id=3), Delete(entry_id=4), Delete(entry_id=5),
                          SetScratchpad("plan"), Answer("yes", question=2), Answer("no")]


def test_malformed_tags_become_errors_and_the_rest_still_parses():
    result = parse_action('<update>no id</update><update id="x">t</update><delete id="2">text</delete>'
                          '<create></create><read>ok</read></create><answer q="0">a</answer><create>never closed')
    assert result.ops == [Read("ok")]
    assert len(result.errors) == 7
    joined = "\n".join(result.errors)
    for fragment in ['needs a id="..."', "id must be written with the digits 0-9", "takes no text", "non-empty text",
                     "stray </create>", "q must be >= 1", "never closed"]:
        assert fragment in joined


def test_unknown_attributes_and_garbage_attributes_are_errors():
    result = parse_action('<create lang="en">x</create><read ==>q</read>')
    assert result.ops == []
    assert "takes no attributes" in result.errors[0]
    assert "malformed attributes" in result.errors[1]


def test_paper_protocol():
    action = ("<update_memory>short term</update_memory><update_query>who founded X</update_query>"
              "<add_memory>X was founded by Y.</add_memory><modify_memory>Memory 2: fixed</modify_memory>"
              "<delete_memory>Memory 1 and Memory 3</delete_memory><final_answer>\\boxed{Y}</final_answer>")  # deletes 1 only
    result = parse_action(action, "paper")
    assert result.errors == []
    assert result.ops == [SetScratchpad("short term"), SetQuery("who founded X"), Create("X was founded by Y."),
                          Update("fixed", rank=2), Delete(rank=1), Answer("\\boxed{Y}")]
    assert result.tags == ["update_memory", "update_query", "add_memory", "modify_memory", "delete_memory",
                           "final_answer"]
    bad = parse_action("<modify_memory>fixed</modify_memory><delete_memory>all</delete_memory>"
                       "<modify_memory>Memory 0: x</modify_memory>", "paper")
    assert bad.ops == [] and len(bad.errors) == 3
    # The other protocol's tags are free text, not operations.
    assert parse_action("<create>x</create>", "paper").ops == []


def test_unknown_protocol_is_a_value_error():
    import pytest

    with pytest.raises(ValueError, match="unknown protocol"):
        parse_action("", "xml")


def test_formatter_refuses_text_that_cannot_round_trip():
    import pytest

    with pytest.raises(ValueError, match="contains </create>"):
        format_ops([Create("a </create> b")])
    with pytest.raises(ValueError, match="no form in the paper protocol"):
        format_ops([Update("x", entry_id=1)], "paper")


def test_long_pathological_actions_parse_in_linear_time():
    for action in ["<create>" * 125_000, "<create>x</create>" * 50_000, "</read>" * 100_000]:
        result = parse_action(action)
        assert len(result.ops) + len(result.errors) in (125_000, 50_000, 100_000)


_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).map(str.strip).filter(
    lambda t: t and "<" not in t)
_atommem_ops = st.one_of(
    st.builds(Create, _text), st.builds(Read, _text),
    st.builds(lambda t, i: Update(t, entry_id=i), _text, st.integers(0, 10**6)),
    st.builds(lambda i: Delete(entry_id=i), st.integers(0, 10**6)),
    st.builds(SetScratchpad, _text | st.just("")),
    st.builds(lambda t, q: Answer(t, question=q), _text, st.none() | st.integers(1, 9)),
)
_paper_ops = st.one_of(
    st.builds(Create, _text), st.builds(SetQuery, _text), st.builds(SetScratchpad, _text | st.just("")),
    st.builds(lambda t, r: Update(t, rank=r), _text, st.integers(1, 50)),
    st.builds(lambda r: Delete(rank=r), st.integers(1, 50)), st.builds(Answer, _text),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_atommem_ops, max_size=8))
def test_atommem_round_trip(ops):
    assert parse_action(format_ops(ops)).ops == ops


@settings(max_examples=200, deadline=None)
@given(st.lists(_paper_ops, max_size=8))
def test_paper_round_trip(ops):
    assert parse_action(format_ops(ops, "paper"), "paper").ops == ops


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_string_parses_without_raising(text):
    parse_action(text)
    parse_action(text, "paper")

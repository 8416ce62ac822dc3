"""The autoglm-action grammar and the Open-AutoGLM reply parser (engine/structured/autoglm.py).

Replies sampled under the grammar by the random model of test_structured_output.py, over the
embedded SmolLM2 tokenizer, must all parse as Open-AutoGLM parses them.
"""

from __future__ import annotations

import pytest

from pagoda.engine.structured import StructuredOutputSpec, from_openai, grammar_names
from pagoda.engine.structured.autoglm import ACTIONS, autoglm_action_ebnf, check_action, parse_action, split_reply
from tests.unit.test_structured_output import accepts, random_model

AUTOGLM = StructuredOutputSpec(grammar="autoglm-action")

# Replies in the forms of Open-AutoGLM's system prompts, and what its parser makes of them.
EXAMPLES = [
    ('<think>The home screen is showing.</think><answer>do(action="Launch", app="Settings")</answer>',
     {"_metadata": "do", "action": "Launch", "app": "Settings"}),
    ("<think>\nTap the search box.\n</think>\n<answer>\ndo(action=\"Tap\", element=[500,120])\n</answer>",
     {"_metadata": "do", "action": "Tap", "element": [500, 120]}),
    ('<answer>do(action="Tap", element=[0, 999], message="pay 10 yuan")</answer>',
     {"_metadata": "do", "action": "Tap", "element": [0, 999], "message": "pay 10 yuan"}),
    ('<answer>do(action="Type", text="hot pot \\"near me\\"")</answer>',  # Type text is taken raw
     {"_metadata": "do", "action": "Type", "text": 'hot pot \\"near me\\"'}),
    ('<answer>do(action="Type_Name", text="Zhang San")</answer>',
     {"_metadata": "do", "action": "Type", "text": "Zhang San"}),
    ('<answer>do(action="Swipe", start=[500,800], end=[500,200])</answer>',
     {"_metadata": "do", "action": "Swipe", "start": [500, 800], "end": [500, 200]}),
    ('<answer>do(action="Long Press", element=[10,20])</answer>',
     {"_metadata": "do", "action": "Long Press", "element": [10, 20]}),
    ('<answer>do(action="Double Tap", element=[10,20])</answer>',
     {"_metadata": "do", "action": "Double Tap", "element": [10, 20]}),
    ('<answer>do(action="Wait", duration="2 seconds")</answer>',
     {"_metadata": "do", "action": "Wait", "duration": "2 seconds"}),
    ('<answer>do(action="Take_over", message="log in, please")</answer>',
     {"_metadata": "do", "action": "Take_over", "message": "log in, please"}),
    ('<answer>do(action="Note", message="True")</answer>', {"_metadata": "do", "action": "Note", "message": "True"}),
    ('<answer>do(action="Call_API", instruction="sum up the page\\n")</answer>',
     {"_metadata": "do", "action": "Call_API", "instruction": "sum up the page\n"}),
    ('<answer>do(action="Interact")</answer>', {"_metadata": "do", "action": "Interact"}),
    ('<answer>do(action="Back")</answer>', {"_metadata": "do", "action": "Back"}),
    ('<answer>do(action="Home")</answer>', {"_metadata": "do", "action": "Home"}),
    ('<think>Done.</think><answer>finish(message="Ordered \\u2615.")</answer>',  # finish's message is raw too
     {"_metadata": "finish", "message": "Ordered \\u2615."}),
]


def test_random_model_replies_all_parse(grammar_compiler, grammar_tok):
    # Tighter bounds than the registered grammar's, so a reply ends within 200 tokens; same rules.
    spec = StructuredOutputSpec(ebnf=autoglm_action_ebnf(max_thought_chars=200, max_string_chars=40))
    replies = random_model(grammar_compiler, grammar_tok, spec, n=50, seed=7)
    actions = [parse_action(reply) for reply in replies]
    for action in actions:
        check_action(action)
    assert len({a.get("action", "finish") for a in actions}) >= 5  # many kinds of action, not one


def test_registered_grammar_replies_parse_within_open_autoglms_max_tokens(grammar_compiler, grammar_tok):
    replies = random_model(grammar_compiler, grammar_tok, AUTOGLM, n=3, seed=8, max_tokens=3000)  # its ModelConfig default
    for reply in replies:
        check_action(parse_action(reply))


@pytest.mark.parametrize("reply, expected", EXAMPLES)
def test_open_autoglm_examples_are_accepted_and_parse(grammar_compiler, grammar_tok, reply, expected):
    assert accepts(grammar_compiler, grammar_tok, AUTOGLM, reply)
    assert parse_action(reply) == expected
    check_action(parse_action(reply))


@pytest.mark.parametrize(
    "reply",
    [
        '<answer>do(action="Tap", element=[1000,5])</answer>',  # coordinates are 0..999
        '<answer>do(action="Tap", element=[05,5])</answer>',
        '<answer>do(action="Fly", element=[5,5])</answer>',  # unknown action
        '<answer>do(action="Swipe", start=[1,2])</answer>',  # missing end
        '<answer>do(action="Type", text="a", app="b")</answer>',  # text must come last
        '<answer>do(action="Type", text="line\nbreak")</answer>',  # raw control character
        '<answer>do(action="Type", text="finish(message=")</answer>',  # would split there
        '<think>maybe do(action="Back")</think><answer>do(action="Home")</answer>',  # marker in the thought
        '<think>a</think><think>b</think><answer>do(action="Home")</answer>',
        '<answer>do(action="Home")',  # unclosed
        'do(action="Home")',  # no tags
        '<answer>do(action="Home")</answer> and more',
        '<answer>do(action="Wait", duration="soon")</answer>',
    ],
)
def test_grammar_rejects(grammar_compiler, grammar_tok, reply):
    assert not accepts(grammar_compiler, grammar_tok, AUTOGLM, reply)


def test_thought_and_strings_are_bounded(grammar_compiler, grammar_tok):
    spec = StructuredOutputSpec(ebnf=autoglm_action_ebnf(max_thought_chars=10, max_string_chars=5))
    assert accepts(grammar_compiler, grammar_tok, spec, '<think>0123456789</think><answer>finish(message="abcde")</answer>')
    assert not accepts(grammar_compiler, grammar_tok, spec, '<think>0123456789x</think><answer>do(action="Back")</answer>')
    assert not accepts(grammar_compiler, grammar_tok, spec, '<answer>finish(message="abcdef")</answer>')


@pytest.mark.parametrize(
    "reply",
    ["click the button", 'do(action="Tap", element=[1,2]', 'do(action="Type")', 'do(action="Tap", element=foo)',
     "do", 'do(action="Tap", element=__import__("os"))'],
)
def test_parse_action_rejects_what_open_autoglm_rejects(reply):
    with pytest.raises(ValueError):
        parse_action(reply)


def test_parse_action_splits_replies_as_open_autoglms_client():
    # finish( anywhere wins over do(; without tags (a GLM server drops them as special tokens) too.
    assert split_reply('I could do(action="Back") or finish(message="ok")') == (
        'I could do(action="Back") or', 'finish(message="ok")')
    assert parse_action('thinking aloud\ndo(action="Home")') == {"_metadata": "do", "action": "Home"}
    assert parse_action('<think>x</think><answer>finish(message="a, b")</answer>') == {
        "_metadata": "finish", "message": "a, b"}
    # Open-AutoGLM does not check names or arguments while parsing; check_action does.
    loose = parse_action('do(action="Fly", element=[1, 2000])')
    assert loose == {"_metadata": "do", "action": "Fly", "element": [1, 2000]}
    for action in (loose, {"_metadata": "do", "action": "Tap", "element": [1, 2000]},
                   {"_metadata": "do", "action": "Tap"}, {"_metadata": "do", "action": "Back", "x": 1}):
        with pytest.raises(ValueError):
            check_action(action)


def test_the_grammar_is_registered_and_reachable_from_requests():
    assert "autoglm-action" in grammar_names()
    assert from_openai({"structured_outputs": {"grammar": "autoglm-action"}}) == AUTOGLM
    assert set(ACTIONS) >= {"Launch", "Tap", "Type", "Swipe", "Back", "Home", "Long Press", "Double Tap", "Wait",
                            "Take_over", "Note", "Call_API", "Interact"}

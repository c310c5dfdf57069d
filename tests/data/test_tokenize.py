"""Label masks: prompts and system turns masked, every assistant turn and its EOS trained."""

from tunepilot.data.formats import Example
from tunepilot.data.tokenize import tokenize_example


def chat(*turns: tuple[str, str]) -> Example:
    return Example(tuple({"role": r, "content": c} for r, c in turns), None, "t.jsonl:1")


def trained_text(tok, t) -> str:
    return "".join(tok.decode([i]) for i, m in zip(t.input_ids, t.loss_mask, strict=True) if m)


def test_only_assistant_tokens_and_eos_are_trained(tokenizer):
    assert tokenizer.pad_token == tokenizer.eos_token  # the trap this test guards against
    t = tokenize_example(
        chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")), tokenizer
    )
    assert trained_text(tokenizer, t) == "Hello!<|im_end|>\n"
    eos_positions = [i for i, x in enumerate(t.input_ids) if x == tokenizer.eos_token_id]
    # EOS closes the system, user and assistant turns; only the assistant's carries loss
    assert [t.loss_mask[i] for i in eos_positions] == [False, False, True]


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    t = tokenize_example(
        chat(("user", "a"), ("assistant", "one"), ("user", "b"), ("assistant", "two")), tokenizer
    )
    assert trained_text(tokenizer, t) == "one<|im_end|>\ntwo<|im_end|>\n"
    assert t.answer == "two"
    prompt = tokenizer.decode(t.input_ids[: t.prompt_length])
    assert prompt.endswith("<|im_start|>assistant\n") and "one" in prompt


def test_plain_text_trains_everything_but_the_first_token(tokenizer):
    t = tokenize_example(Example(None, "the quick brown fox", "t.jsonl:1"), tokenizer)
    assert t.loss_mask[0] is False and all(t.loss_mask[1:])
    assert t.input_ids[-1] == tokenizer.eos_token_id
    assert t.answer is None


def test_tokenization_cache_returns_identical_examples_and_follows_content(tokenizer, tmp_path):
    from tunepilot.data.tokenize import tokenize_examples

    examples = [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(5)]
    fresh = tokenize_examples(examples, tokenizer, tmp_path)
    assert tokenize_examples(examples, tokenizer, tmp_path) == fresh  # read back from cache
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    changed = [*examples[:4], chat(("user", "q4"), ("assistant", "different"))]
    assert tokenize_examples(changed, tokenizer, tmp_path)[4] != fresh[4]
    assert len(list((tmp_path / "tokens").iterdir())) == 2


def test_eval_examples_copied_from_training_are_found():
    from tunepilot.data.tokenize import Tokenized, seen_in_training

    def ex(ids: list[int], where: str) -> Tokenized:
        return Tokenized(ids, [True] * len(ids), 1, None, where)

    train = [ex([1, 2, 3], "t:1"), ex([4, 5], "t:2"), ex([1, 2, 3], "t:3")]
    eval_ = [ex([4, 5], "e:1"), ex([4, 5, 6], "e:2"), ex([1, 2, 3], "e:3"), ex([1, 2], "e:4")]
    assert seen_in_training(train, eval_) == [("e:1", "t:2"), ("e:3", "t:1")]
    assert seen_in_training(train, [ex([9], "e:1")]) == []

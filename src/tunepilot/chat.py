"""``tunepilot chat``: talk to a model through its chat template, tokens streamed as they come.

Replies go to stdout and nothing else does (prompts and notices go to stderr), so
``tunepilot chat RUN --prompt "..." > answer.txt`` captures just the answer. The conversation is
kept as a message list and re-rendered by the chat template every turn, exactly as training saw
it; the oldest turns are dropped when it would outgrow the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

import torch

from tunepilot.errors import Terminated, UserError
from tunepilot.inference import Loaded, context_length
from tunepilot.train.step import autocast

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    from transformers import TextStreamer

    class _To(TextStreamer):
        """TextStreamer writes with print(); this one writes to the stream it is given."""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _To(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _prompt_ids(loaded: Loaded, convo: Conversation, max_new_tokens: int) -> list[int]:
    """The rendered conversation's token ids, dropping the oldest exchanges to fit."""
    limit = context_length(loaded.model) - max_new_tokens
    while True:
        text = loaded.tokenizer.apply_chat_template(
            convo.messages(), tokenize=False, add_generation_prompt=True
        )
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return list(ids)
        if len(convo.turns) <= 1:
            raise UserError(
                f"the message is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} the "
                f"model's context of {limit + max_new_tokens} is exceeded; shorten it"
            )
        del convo.turns[:2]  # the oldest user message and its reply


@torch.no_grad()
def reply(
    loaded: Loaded, convo: Conversation, max_new_tokens: int, temperature: float, out: TextIO
) -> str:
    """Generate the assistant's answer to the conversation, streaming it to ``out``."""
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = _prompt_ids(loaded, convo, max_new_tokens)
    input_ids = torch.tensor([ids], device=loaded.device)
    stop = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    # greedy unless asked: reproducible answers are what you want when checking a fine-tune
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
    sampling.setdefault("do_sample", False)
    with autocast(loaded.precision, loaded.device):
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(i for i in stop if i is not None),
            streamer=_streamer(tokenizer, out),
            **sampling,
        )
    return tokenizer.decode(output[0, len(ids) :], skip_special_tokens=True).strip()


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def one_shot(
    loaded: Loaded,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    system: str | None = None,
    out: TextIO | None = None,
) -> str:
    import sys

    convo = Conversation(system, [{"role": "user", "content": prompt}])
    return reply(loaded, convo, max_new_tokens, temperature, out or sys.stdout)


def repl(
    loaded: Loaded,
    max_new_tokens: int,
    temperature: float,
    system: str | None,
    inp: TextIO,
    out: TextIO,
    err: TextIO,
) -> None:
    """Read a message per line until EOF or /exit; /reset forgets the conversation; at a
    terminal, Ctrl-C stops the reply being written (at the prompt it quits)."""
    interactive = inp.isatty()
    err.write(
        f"chatting with {loaded.name} on {loaded.device} ({loaded.precision}); "
        f"{EXIT_COMMANDS[0]} or Ctrl-D quits, {RESET_COMMAND} forgets the conversation\n"
    )
    convo = Conversation(system)
    while True:
        if interactive:
            err.write("you> ")
            err.flush()
        line = inp.readline()
        if not line:
            break  # EOF
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            convo.turns.clear()
            err.write("(conversation forgotten)\n")
            continue
        convo.turns.append({"role": "user", "content": text})
        if interactive:
            err.write("model> ")
            err.flush()
        try:
            answer = reply(loaded, convo, max_new_tokens, temperature, out)
        except UserError as exc:
            convo.turns.pop()
            err.write(f"error: {exc}\n")
            continue
        except Terminated:
            raise
        except KeyboardInterrupt:
            if not interactive:
                raise
            # Ctrl-C in a chat stops a rambling reply, as in other chat programs; the message
            # and its cut answer are forgotten so the next turn is not read against them
            convo.turns.pop()
            out.write("\n")
            err.write("(reply stopped and forgotten; /exit or Ctrl-D quits)\n")
            continue
        convo.turns.append({"role": "assistant", "content": answer})

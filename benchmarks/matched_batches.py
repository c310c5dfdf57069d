"""Where the lead over group_by_length comes from: the same 8 examples, padded or packed.

    .venv/bin/python benchmarks/matched_batches.py [--precision fp32|bf16] [--rounds 6]
        [--quantiles 0.1,0.5,0.8,0.95,1.0]

compare.py's data and full fine-tune, but one forward + backward at a time instead of whole
runs: the examples are sorted by length and 8 neighbours taken at each quantile, which is the
batch `group_by_length` builds at its best (little padding). Each batch goes through
transformers' own forward and loss on the padded [8, longest] batch (what the Trainer runs per
micro-batch) and through tunepilot's packed row (`data.batching.pack` and
`train.step.loss_sum`), alternately, `--rounds` times; the first round is left out and the
medians are printed beside the FLOP ratio: the padded batch's matmul FLOPs (every position,
pads included) over the packed row's (the output head at supervised positions only). Where the
time ratio equals the FLOP ratio, both run their FLOPs equally fast and the lead is the work
tunepilot skips; a time ratio under the FLOP ratio means tunepilot's work runs slower.

Both paths run in this process under the same malloc: tcmalloc where installed, as the CLI
does. The optimizer step and clipping, the same for both, are not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--rounds", type=int, default=6, help="the first is left out")
    parser.add_argument("--quantiles", default="0.1,0.5,0.8,0.95,1.0")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: the first is left out")

    from tunepilot.train.allocator import relaunch_with_tcmalloc

    relaunch_with_tcmalloc()  # both paths under the malloc the CLI trains with
    import torch
    from transformers import DataCollatorForSeq2Seq

    import compare
    import longtail
    from tunepilot.data.batching import pack
    from tunepilot.run import load_trainable, resized_vocab
    from tunepilot.train.attention import use_packed_attention
    from tunepilot.train.step import autocast, loss_sum

    with tempfile.TemporaryDirectory(prefix="tunepilot-matched-") as work:
        data = longtail.write(Path(work) / "train.jsonl", 512, seed=0)
        (Path(work) / "eval.jsonl").write_text('{"text": "held-out line."}\n')
        spec = {
            "data": str(data),
            "eval": str(Path(work) / "eval.jsonl"),
            "method": "full",
            "steps": 8,
            "precision": args.precision,
            "options": {},
        }
        prep = compare._prepared(spec)
    n_params = compare.matmul_params("smollm2-135m-instruct")
    # two copies of the same weights: packed attention is installed on tunepilot's only
    padded_model = load_trainable(prep.cfg, prep.source, resized_vocab(prep))
    packed_model = load_trainable(prep.cfg, prep.source, resized_vocab(prep))
    use_packed_attention(packed_model, flash=False)
    head = packed_model.get_output_embeddings().weight.numel()
    by_length = sorted(prep.train, key=lambda ex: len(ex.input_ids))
    # the Trainer's rows and collator in compare.py: right-padded to the longest example
    collate = DataCollatorForSeq2Seq(prep.tokenizer, padding=True, label_pad_token_id=-100)

    def timed(run: Any) -> float:
        for model in (padded_model, packed_model):
            model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    print(
        f"full fine-tune, {args.precision}, forward + backward of 8 examples; medians of "
        f"rounds 2-{args.rounds}; FLOP ratio: the padded batch's matmul FLOPs (every position, "
        "pads included) over the packed row's (the output head at supervised positions only)\n"
    )
    print(
        "| lengths | real tokens | padded tokens | supervised | transformers padded | "
        "tunepilot packed | time ratio | FLOP ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for quantile in map(float, args.quantiles.split(",")):
        start = min(len(by_length) - 8, int(quantile * len(by_length)))
        group = by_length[start : start + 8]
        batch = collate([compare.trainer_row(ex) for ex in group])
        row = pack(group, compare.MAX_LENGTH)

        def run_padded(batch: dict[str, torch.Tensor] = batch) -> None:
            with autocast(args.precision, "cpu"):
                loss = padded_model(**batch).loss
            loss.backward()

        def run_packed(row: Any = row) -> None:
            loss_sum(packed_model, row, args.precision, "cpu").backward()

        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(args.rounds):
            times[0].append(timed(run_padded))
            times[1].append(timed(run_packed))
        padded_s, packed_s = (statistics.median(t[1:]) for t in times)
        real, supervised = row.real_tokens, row.supervised_tokens
        processed = batch["input_ids"].numel()
        flops_padded = n_params * processed
        flops_packed = (n_params - head) * real + head * supervised
        lengths = [len(ex.input_ids) for ex in group]
        print(
            f"| {min(lengths)}-{max(lengths)} | {real} | {processed} | {supervised} | "
            f"{padded_s:.2f} s ({real / padded_s:.0f} tok/s) | "
            f"{packed_s:.2f} s ({real / packed_s:.0f} tok/s) | "
            f"{padded_s / packed_s:.2f}x | {flops_padded / flops_packed:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

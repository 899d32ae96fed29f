"""`pdserve bench engine`: the engine alone, in process, side by side with HF transformers on the same weights.

Sides, all in one run:
- pdserve dense: the engine on float32 weights, the very tensors transformers multiplies;
- pdserve blocks (GGUF models whose linears are Q4_1/Q8_0): the same engine keeping those
  weights in their GGUF blocks and expanding them, inside the matmul, to the same float32
  values; arithmetic is float32 and activations are never quantized. Batches of more than
  `prepack.BLOCK_PATH_MAX_ROWS` tokens (prefill, large decode batches) run the dense weights;
- transformers: HF `generate` on the float32 weights it dequantizes from the same file.
Measured, each as the median over `--repeats` runs (the sides' runs interleaved, so a
noisy neighbour slows all alike):
- prefill tokens/s: one `--prompt-len`-token prompt, prompt in to first token out;
- decode tokens/s at each batch size: `--batch-sizes` requests of `--decode-prompt-len`
  tokens prefilled (not timed), then `--decode-steps` steps timed; aggregate tokens/s.
  transformers: `generate(max_new_tokens=steps + 1)` minus `generate(max_new_tokens=1)`.
Both sides run float32 (or `--dtype`) with `--threads` torch threads, greedy, no early stop.
llama.cpp (llama-cpp-python on the model's GGUF, its own quantized weights) is a reference
row when installed.

torch, transformers and the engine are imported inside `run`: registering the CLI stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

GOALS = {"prefill": 1.0, "decode_b1": 2.0, "decode_b32_vs_hf_b1": 10.0}


@dataclass
class Row:
    name: str  # "prefill" or "decode_b{n}"
    tokens: int  # tokens per timed run
    engine_s: list[float]  # pdserve, dense float32 weights
    hf_s: list[float]  # transformers; empty without it
    blocks_s: list[float] = field(default_factory=list)  # pdserve, GGUF-block weights; empty without them

    @property
    def engine_tps(self) -> float:
        return self.tokens / statistics.median(self.engine_s)

    @property
    def blocks_tps(self) -> float | None:
        return self.tokens / statistics.median(self.blocks_s) if self.blocks_s else None

    @property
    def hf_tps(self) -> float | None:
        return self.tokens / statistics.median(self.hf_s) if self.hf_s else None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _batch_sizes(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part]


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="preset, HF folder or .gguf (default smollm2-135m)")
    parser.add_argument("--threads", type=_positive_int, default=2, help="torch threads, both sides (default 2)")
    parser.add_argument("--dtype", default="float32", help="weights, both sides (default float32)")
    parser.add_argument("--prompt-len", type=_positive_int, default=1024, help="prefill prompt tokens (default 1024)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32], help="decode batch sizes (default 1,8,32)")
    parser.add_argument("--decode-prompt-len", type=_positive_int, default=128, help="prompt tokens per decode request (default 128)")
    parser.add_argument("--decode-steps", type=_positive_int, default=32, help="timed decode steps (default 32)")
    parser.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per case; medians (default 3)")
    parser.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048, help="engine token budget per step (default 2048)")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false", help="engine rows only")
    parser.add_argument("--result-file", type=Path, help="write the numbers as JSON here")


def run(args: argparse.Namespace) -> int:
    import torch

    from shared.engine.dtypes import parse_dtype
    from shared.engine.loader import load_model

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    loaded = load_model(args.model, dtype=dtype)
    dense = _EngineSide(loaded, args, block_weights=False)
    blocks = _EngineSide(loaded, args, block_weights=True) if loaded.block_weights else None
    blocks_problem = "the model has no Q4_1/Q8_0 GGUF weights in float32" if blocks is None else blocks.problem
    hf = _HfSide.load(args.model, dtype) if args.transformers else None
    vocab = dense.vocab_size
    print(f"model {args.model}, {args.dtype}, {args.threads} torch threads, medians of {args.repeats} runs")
    if hf is not None and hf.problem:
        print(f"transformers: {hf.problem}")
        hf = None
    print(_legend(blocks_problem, hf is not None))
    sides: dict[str, Side] = {"dense": dense}
    if blocks is not None and blocks_problem is None:
        sides["blocks"] = blocks
    if hf is not None:
        sides["hf"] = hf
    cases = {name: functools.partial(_prefill_run, side, args.prompt_len, vocab) for name, side in sides.items()}
    rows = [_measure("prefill", args.prompt_len, args.repeats, cases)]
    for batch in args.batch_sizes:
        cases = {name: functools.partial(_decode_run, side, batch, args.decode_prompt_len, args.decode_steps, vocab) for name, side in sides.items()}
        rows.append(_measure(f"decode_b{batch}", batch * args.decode_steps, args.repeats, cases))
    print(format_table(rows, args))
    for warning in noise_warnings(rows):
        print(warning)
    print(f"llama.cpp (llama-cpp-python): {_llama_cpp_row(args, vocab)}")
    if args.result_file:
        args.result_file.write_text(json.dumps(_result(rows, args), indent=2))
    return 0


class Side(Protocol):
    """One implementation under test; each call returns the seconds its timed part took."""

    def prefill(self, prompt: list[int]) -> float: ...

    def decode(self, prompts: list[list[int]], steps: int) -> float: ...


Case = Callable[[int], float]  # run number (-1: warm-up) -> seconds


def _prefill_run(side: Side, length: int, vocab: int, run: int) -> float:
    return side.prefill(_prompts(1, length, vocab, seed=run)[0])


def _decode_run(side: Side, batch: int, prompt_len: int, steps: int, vocab: int, run: int) -> float:
    return side.decode(_prompts(batch, prompt_len, vocab, seed=100 + run), steps)


def _measure(name: str, tokens: int, repeats: int, cases: Mapping[str, Case]) -> Row:
    """One unmeasured warm-up each, then `repeats` timed runs of every case in turn; keys "dense", "blocks", "hf"."""
    for case in cases.values():
        case(-1)
    timings: dict[str, list[float]] = {side: [] for side in cases}
    for r in range(repeats):
        for side, case in cases.items():
            timings[side].append(case(r))
    return Row(name, tokens, timings["dense"], timings.get("hf", []), timings.get("blocks", []))


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(10, vocab, (count, length), generator=generator).tolist()


_BLOCK_SIZE = 16
_DECODE_SLACK = 64  # max_tokens beyond the timed steps (see _EngineSide.decode)


def _pages(tokens: int) -> int:
    return -(-tokens // _BLOCK_SIZE)


class _EngineSide:
    """The engine on the model's dense float32 weights, or (`block_weights`) on its GGUF blocks; `problem` says why not."""

    def __init__(self, loaded, args: argparse.Namespace, block_weights: bool):
        from shared.engine.engine import Engine, SchedulingConfig
        from shared.engine.prepack import uses_block_weights

        if not block_weights:
            loaded = dataclasses.replace(loaded, block_weights={})
        self.vocab_size = loaded.config.vocab_size
        longest = max(args.prompt_len + 1, args.decode_prompt_len + args.decode_steps + _DECODE_SLACK)
        if longest > loaded.config.max_position_embeddings:
            raise SystemExit(f"{longest} tokens exceed the model's context of {loaded.config.max_position_embeddings}")
        pages = max(_pages(args.prompt_len + 1), max(args.batch_sizes) * _pages(args.decode_prompt_len + args.decode_steps + _DECODE_SLACK))
        self.engine = Engine(
            loaded,
            kv_cache_tokens=pages * _BLOCK_SIZE,
            block_size=_BLOCK_SIZE,
            scheduling=SchedulingConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=max(args.batch_sizes)),
        )
        self.problem = None
        if block_weights and not uses_block_weights(self.engine.model):
            self.problem = "the block kernel is unavailable on this machine (its reason is logged)"
        self._next_id = 0

    def _ids(self, count: int) -> list[str]:
        self._next_id += count
        return [f"bench-{self._next_id - count + i}" for i in range(count)]

    def prefill(self, prompt: list[int]) -> float:
        """Seconds from queueing the prompt to its first token."""
        from shared.engine.sampling import SamplingParams

        (request_id,) = self._ids(1)
        started = time.perf_counter()
        self.engine.add_request(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=1))
        while not any(out.request_id == request_id for out in self.engine.step()):
            pass
        elapsed = time.perf_counter() - started
        self.engine.free(request_id)
        return elapsed

    def decode(self, prompts: list[list[int]], steps: int) -> float:
        """Seconds for `steps` decode steps of the whole batch, after every prompt has its first token."""
        from shared.engine.sampling import SamplingParams

        # Prompts beyond the step's token budget prefill over several steps while the first
        # ones decode ahead: room for those extra tokens, so no request ends inside the timed steps.
        sampling = SamplingParams(temperature=0.0, max_tokens=steps + _DECODE_SLACK, ignore_eos=True)
        request_ids = self._ids(len(prompts))
        for request_id, prompt in zip(request_ids, prompts):
            self.engine.add_request(request_id, prompt, sampling)
        started_ids: set[str] = set()
        while len(started_ids) < len(prompts):
            started_ids.update(out.request_id for out in self.engine.step())
        started = time.perf_counter()
        for _ in range(steps):
            produced = len(self.engine.step())
            assert produced == len(prompts), f"a decode step produced {produced} tokens for a batch of {len(prompts)}"
        elapsed = time.perf_counter() - started
        for request_id in request_ids:
            self.engine.free(request_id)
        return elapsed


class _HfSide:
    def __init__(self, model, problem: str | None = None):
        self.model = model
        self.problem = problem

    @classmethod
    def load(cls, name: str, dtype) -> _HfSide:
        if importlib.util.find_spec("transformers") is None:
            return cls(None, "not installed (pip install transformers accelerate gguf), baseline rows skipped")
        from transformers import AutoModelForCausalLM

        from shared.engine.presets import GgufSource, HfFolderSource, resolve_source

        source = resolve_source(name)
        match source:
            case GgufSource(path=path):
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
            case HfFolderSource(path=path):
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            case _:
                return cls(None, f"{name} has random weights transformers cannot load; baseline rows skipped")
        return cls(model.eval())

    def prefill(self, prompt: list[int]) -> float:
        import torch

        ids = torch.tensor([prompt])
        started = time.perf_counter()
        with torch.inference_mode():
            self.model(ids, use_cache=True, logits_to_keep=1)  # what generate() runs for the prompt
        return time.perf_counter() - started

    def decode(self, prompts: list[list[int]], steps: int) -> float:
        """generate(steps + 1 tokens) minus generate(1 token): the decode steps alone."""
        return self._generate(prompts, steps + 1) - self._generate(prompts, 1)

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        import torch

        ids = torch.tensor(prompts)
        started = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # no early stop on EOS: every row runs every step
                do_sample=False,
                pad_token_id=0,
            )
        return time.perf_counter() - started


def _legend(blocks_problem: str | None, with_hf: bool) -> str:
    from shared.engine.prepack import BLOCK_PATH_MAX_ROWS

    lines = ["pdserve dense : the engine on float32 weights (the tensors transformers multiplies)"]
    if blocks_problem is None:
        lines.append(
            "pdserve blocks: the engine on the GGUF's Q4_1/Q8_0 weight blocks, expanded in the matmul to those same float32 "
            f"values; float32 arithmetic, activations not quantized; batches over {BLOCK_PATH_MAX_ROWS} tokens run dense"
        )
    else:
        lines.append(f"pdserve blocks: not run ({blocks_problem})")
    if with_hf:
        lines.append("transformers  : HF generate() on float32 weights dequantized from the same file")
    return "\n".join(lines)


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    hf_b1 = next((row.hf_tps for row in rows if row.name == "decode_b1"), None)
    columns = ("pdserve dense", "pdserve blocks", "transformers", "dense/HF", "blocks/HF")
    lines = [f"{'case (tok/s)':<36}" + "".join(f"{c:>16}" for c in columns) + "   goal"]

    def line(label: str, row: Row, hf: float | None, goal: str) -> str:
        values = (_fmt(row.engine_tps), _fmt(row.blocks_tps), _fmt(hf), _ratio(row.engine_tps, hf), _ratio(row.blocks_tps, hf))
        return f"{label:<36}" + "".join(f"{v:>16}" for v in values) + f"   {goal}".rstrip()

    for row in rows:
        if row.name == "prefill":
            lines.append(line(f"prefill, 1 x {args.prompt_len} tokens", row, row.hf_tps, f">= {GOALS['prefill']:g}x"))
        else:
            batch = int(row.name.removeprefix("decode_b"))
            goal = f">= {GOALS['decode_b1']:g}x" if batch == 1 else ""
            lines.append(line(f"decode, batch {batch} (aggregate)", row, row.hf_tps, goal))
    for row in rows:
        if row.name == "decode_b32" and hf_b1:
            lines.append(line("decode, batch 32 vs transformers b1", row, hf_b1, f">= {GOALS['decode_b32_vs_hf_b1']:g}x"))
    return "\n".join(lines)


NOISY_SPREAD = 1.25  # slowest / fastest run of one case beyond which its median is suspect


def noise_warnings(rows: list[Row]) -> list[str]:
    """One line per case whose runs disagree a lot: on a shared machine a neighbour took the cores."""
    warnings = []
    for row in rows:
        for side, runs in (("pdserve dense", row.engine_s), ("pdserve blocks", row.blocks_s), ("transformers", row.hf_s)):
            if len(runs) > 1 and max(runs) / min(runs) > NOISY_SPREAD:
                warnings.append(f"noisy: {row.name} {side} runs differ {max(runs) / min(runs):.1f}x (fastest {min(runs):.3f}s); rerun on a quiet machine")
    return warnings


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if not ours or not theirs else f"{ours / theirs:.2f}x"


def _llama_cpp_row(args: argparse.Namespace, vocab: int) -> str:
    if importlib.util.find_spec("llama_cpp") is None:
        return "not installed"
    from shared.engine.presets import GgufSource, resolve_source

    source = resolve_source(args.model)
    if not isinstance(source, GgufSource):
        return "skipped (needs a GGUF model)"
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(source.path), n_threads=args.threads, n_ctx=args.prompt_len + 64, verbose=False)
    prompt = _prompts(1, args.prompt_len, vocab, seed=0)[0]
    started = time.perf_counter()
    llm.eval(prompt)
    prefill_tps = len(prompt) / (time.perf_counter() - started)
    llm.reset()
    llm.eval(prompt[: args.decode_prompt_len])
    started = time.perf_counter()
    for _ in range(args.decode_steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_tps = args.decode_steps / (time.perf_counter() - started)
    return f"prefill {prefill_tps:.1f} tok/s, decode batch 1 {decode_tps:.1f} tok/s (its own quantized GGUF weights)"


def _result(rows: list[Row], args: argparse.Namespace) -> dict:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": [{**asdict(row), "engine_tok_s": row.engine_tps, "blocks_tok_s": row.blocks_tps, "hf_tok_s": row.hf_tps} for row in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="pdserve bench engine", description=__doc__.split("\n\n")[0])
    register(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())

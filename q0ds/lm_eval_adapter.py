"""lm-evaluation-harness (0.4.13) for q0 populations: the `q0mix` model type and the shipped local tasks.

`q0mix` scores the *probability mixture* of several HF causal-LM dirs that share one tokenizer:

    log p(continuation | context) = sum_t log sum_i w_i p_i(y_t | y_<t)

computed per position as logsumexp_i(log_softmax(logits_i) + log w_i) in float32 (`softmax_dtype`).
`is_greedy` is true when the argmax of the mixture equals the continuation token at every position.
Tokenisation, truncation, batching and rolling windows copy lm_eval's own `hf` model (HFLM), so weights
(1, 0) give exactly HFLM's numbers for the first member (float32 members; for bf16 members compare with
HFLM(softmax_dtype="float32"), which is what `run_lm_eval_hf` uses).

Python:
    from q0ds.lm_eval_adapter import MixLM, run_lm_eval, run_lm_eval_hf
    lm = MixLM(pretrained=["m1", "m2"], weights=[0.5, 0.5])          # or pretrained="m1|m2", weights="0.5|0.5"
    lm = MixLM(run="runs/demo", k=4)                                  # top-4 members of runs/demo/prior.json
    run_lm_eval("runs/demo", k=4, tasks=["q0ds_mc", "q0ds_ppl"])     # -> runs/demo/lm_eval_k4.json
    run_lm_eval_hf("runs/demo/bases/base-00/snapshots/cycle-0003", tasks=["q0ds_ppl"])  # one snapshot, `hf`

q0ds CLI:   q0ds lm-eval --run RUN --k K --tasks q0ds_mc,q0ds_ppl [--include-path DIR] [--limit N]

Raw lm_eval CLI with `q0mix` registered (lm_eval has no plugin flag, so this module wraps its CLI). It adds
`--include_path q0ds/tasks` when you give none (lm_eval takes one include path: yours replaces ours):
    python -m q0ds.lm_eval_adapter --model q0mix --model_args run=runs/demo,k=4 --tasks q0ds_mc,q0ds_ppl \\
        --device cpu --batch_size 8 --output_path out/
    --model_args 'pretrained=m1|m2,weights=0.5|0.5'   (commas split model_args, so lists use "|"; JSON works too)
    python -m q0ds.lm_eval_adapter validate --tasks q0ds_mc,q0ds_ppl    (cheap check that the tasks load)

Shipped tasks (q0ds/tasks/, see q0ds_taskdata.py there): `q0ds_mc` (next-sentence multiple choice, acc /
acc_norm) and `q0ds_ppl` (rolling log-likelihood: word_perplexity, byte_perplexity, bits_per_byte), both on
CPython stdlib docstrings; they load from any CWD and need no network.

Memory: all members with a non-zero weight are loaded once, at construction, and run one after another on
each batch; only a running [batch, len, vocab] log-mixture is kept between them (2 such tensors at peak, not
K). That suits q0 members (K small models; e.g. 8 x 1.8B in bf16 is 29 GB). If K models do not fit on the
device, pass `offload=True`: members then live in host RAM and each is moved to the device for its forward
pass only (one member's weights on the device at a time, at the price of K host->device copies per batch;
use a large batch_size to amortise). Zero-weight members are never loaded (but their tokenizer is checked).

Pitfalls (see docs/lm-eval.md): lm_eval's `--use_cache PATH` is keyed on the requests only, not on the model
args, so use one PATH per (run, K, weights); the lm_eval CLI passes device="cuda:0" by default, and q0mix
falls back to the CPU when CUDA is absent.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .compat import missing_extra

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text, resolve_max_length)
    from lm_eval.models.utils_hf import pad_and_concat
except ImportError as e:           # not installed, or a release without these names (setup.py: eval extra)
    raise missing_extra("eval", "q0ds lm-eval", e) from None

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_TASKS = ("q0ds_mc", "q0ds_ppl")
DEFAULT_MAX_LENGTH = 2048          # HFLM's default when neither config nor tokenizer gives one


class LMEvalError(ValueError):
    """A user-facing error in the mixture's arguments (members, weights, tokenizers). Problems with
    RUN/prior.json or K raise q0ds.population.PriorError, as q0ds.ensemble does."""


# --------------------------------------------------------------------------------------- members
def _as_list(x, typ) -> list:
    """A list/tuple, or the CLI form "a|b" (commas already split lm_eval's model_args)."""
    if isinstance(x, (list, tuple)):
        return [typ(v) for v in x]
    return [typ(v) for v in str(x).split("|") if str(v).strip()]


def snapshot_path(run, member_id: str) -> Path:
    """`base-XX/cycle-XXXX` -> RUN/bases/base-XX/snapshots/cycle-XXXX."""
    base, sep, cycle = str(member_id).partition("/")
    if not sep or not base or not cycle:
        raise LMEvalError(f"member id {member_id!r} is not of the form base-XX/cycle-XXXX")
    return Path(run) / "bases" / base / "snapshots" / cycle


def resolve_run(run, k: int) -> tuple[list[str], list[Path], list[float]]:
    """(member ids, snapshot dirs, renormalised weights) of the top-K members of RUN/prior.json; the
    snapshots' weights are checked against their snapshot.json (sha256), as q0ds.ensemble does."""
    from .population import PriorError
    from .prior import read_prior_json, top_k
    from .snapshot import verify
    path = Path(run) / "prior.json"
    if not path.is_file():
        raise PriorError(f"{path} not found: run `q0ds fit-prior --run {run}` first")
    prior = read_prior_json(path)
    members, M = prior["members"], len(prior["members"])
    k = int(k)
    if not 1 <= k <= M:
        raise PriorError(f"k={k} is out of range: {path} has {M} member{'s' * (M != 1)}, so 1 <= k <= {M}")
    row = prior["topk"].get(str(k))
    if row is not None:
        ids, weights = list(row["members"]), [float(w) for w in row["weights"]]
    else:                                                  # a K the table does not list
        idx, w = top_k(prior["weights"], k)
        ids, weights = [members[i] for i in idx], w.tolist()
    dirs = [snapshot_path(run, m) for m in ids]
    for d in dirs:
        verify(d)
    return ids, dirs, weights


def _tokenizer_fingerprint(tok) -> str:
    """Everything that decides token ids: the fast tokenizer's full spec (vocab, merges, normalizer,
    pre-tokenizer, added tokens) or the vocab of a slow one, plus the special-token ids."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
    else:
        spec = sorted(tok.get_vocab().items())
    spec = [spec, type(tok).__name__, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    return json.dumps(spec, sort_keys=True)


def check_shared_tokenizer(paths) -> None:
    """Raise LMEvalError unless every dir has the same tokenizer and the same model vocab size."""
    from transformers import AutoConfig
    from .snapshot import check_files, load_tokenizer
    ref = None
    for p in paths:
        check_files(p)                             # config.json and the tokenizer files parse (names the file)
        tok = load_tokenizer(p)
        vocab = AutoConfig.from_pretrained(str(p)).vocab_size
        fp = (_tokenizer_fingerprint(tok), vocab)
        if ref is None:
            ref = (p, fp)
        elif fp != ref[1]:
            what = "model vocab_size" if fp[0] == ref[1][0] else "tokenizer"
            raise LMEvalError(f"{p} and {ref[0]} differ in their {what}: a token-level probability mixture "
                              "needs members that share one tokenizer and vocabulary")


# --------------------------------------------------------------------------------------- the model
def _pick_device(device=None) -> str:
    """`device`, or CUDA when present; the lm_eval CLI passes cuda:0 by default, even on CPU-only hosts."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("q0mix: CUDA is not available, using the CPU instead of %s", device)
        return "cpu"
    return str(device)


def _register(cls):
    # `python -m q0ds.lm_eval_adapter` executes this file as __main__; main() then imports the real module,
    # which registers the name. Registering __main__'s copy too would be a name collision in lm_eval.
    return cls if __name__ == "__main__" else register_model("q0mix")(cls)


@_register
class MixLM(TemplateLM):
    """Probability mixture of HF causal LMs sharing one tokenizer (see the module docstring)."""

    def __init__(self, pretrained=None, weights=None, run=None, k=None, max_length=None, batch_size=4,
                 device=None, dtype="auto", softmax_dtype="float32", offload=False, add_bos_token=None,
                 prefix_token_id=None, logits_cache=True, trust_remote_code=False, **kw):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        kw.pop("max_batch_size", None)                    # the lm_eval CLI always passes these
        if kw:
            log.warning("q0mix: ignoring unknown model args %s", sorted(kw))

        # members and weights
        if (run is None) == (pretrained is None):
            raise LMEvalError("give either pretrained=<dirs> (with optional weights) or run=<RUN> and k=<K>")
        if run is not None:
            if k is None:
                raise LMEvalError("run=<RUN> needs k=<K> (the number of top-weighted members to mix)")
            if weights is not None:
                raise LMEvalError("weights come from RUN/prior.json when run= is given; do not pass weights")
            self.member_ids, paths, w = resolve_run(run, int(k))
            paths = [str(p) for p in paths]
        else:
            paths = _as_list(pretrained, str)
            self.member_ids = list(paths)
            w = [1.0] * len(paths) if weights is None else _as_list(weights, float)
        if not paths:
            raise LMEvalError("no members given")
        if len(w) != len(paths):
            raise LMEvalError(f"{len(paths)} members but {len(w)} weights")
        if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
            raise LMEvalError(f"weights must be finite, non-negative and not all zero, got {w}")
        total = sum(w)
        self.paths, self.weights = paths, [x / total for x in w]

        # one tokenizer for all (checked), HFLM's conventions for it
        check_shared_tokenizer(paths)
        self.tokenizer = AutoTokenizer.from_pretrained(paths[0], trust_remote_code=trust_remote_code)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.logits_cache = bool(logits_cache)

        # device (the lm_eval CLI passes cuda:0 by default, even on CPU-only machines)
        self._device = torch.device(_pick_device(device))
        self.offload = bool(offload) and self._device.type != "cpu"
        self.softmax_dtype = getattr(torch, softmax_dtype) if isinstance(softmax_dtype, str) else softmax_dtype

        # models with a non-zero weight, loaded now (see "Memory" in the module docstring)
        active = [i for i, x in enumerate(self.weights) if x > 0]
        self._log_w = [math.log(self.weights[i]) for i in active]
        home = torch.device("cpu") if self.offload else self._device
        self._models = []
        for i in active:
            m = AutoModelForCausalLM.from_pretrained(paths[i], dtype=dtype, trust_remote_code=trust_remote_code,
                                                     local_files_only=os.path.isdir(paths[i]))
            self._models.append(m.to(home).eval())

        if max_length is not None:
            self._max_length = int(max_length)
        else:
            self._max_length = min(resolve_max_length(AutoConfig.from_pretrained(p), self.tokenizer,
                                                      default=DEFAULT_MAX_LENGTH) for p in paths)
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            log.warning("q0mix: batch_size=%s is not supported, using 4", batch_size)
            batch_size = 4
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise LMEvalError(f"batch_size must be >= 1, got {batch_size}")

    # ---- properties lm_eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:                      # as HFLM: custom, else BOS, else EOS
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"q0mix_members": self.member_ids, "q0mix_weights": self.weights}

    # ---- tokenisation: HFLM.tok_encode
    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- the mixture
    def _member_logits(self, j: int, inps: torch.Tensor, **kw):
        model = self._models[j]
        if not self.offload:
            return model(inps, **kw)
        model.to(self._device)
        try:
            return model(inps, **kw)
        finally:
            model.to("cpu")

    @torch.no_grad()
    def _mixture_logprobs(self, inps: torch.Tensor) -> torch.Tensor:
        """log sum_i w_i softmax(logits_i) for a [B, L] batch -> [B, L, V]; members run one at a time."""
        mix = None
        for j, lw in enumerate(self._log_w):
            lp = F.log_softmax(self._member_logits(j, inps).logits, dim=-1, dtype=self.softmax_dtype)
            if len(self._log_w) == 1:                       # a single member: exactly its log-softmax
                return lp
            lp += lw
            mix = lp if mix is None else torch.logaddexp(mix, lp, out=mix)
        return mix

    # ---- lm_eval API
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
        """HFLM._loglikelihood_tokens (causal branch) with the mixture in place of one model's log-softmax:
        same sort, same one-token-continuation sharing, same batches, same right padding, same slicing."""
        res = []

        def _collate(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=lambda req: req[-2] + req[-1][:-1])
        for chunk in re_ord.get_batched(n=self.batch_size):
            inps, cont_toks_list, inplens = [], [], []
            for _, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0 and 0 < len(continuation_enc) <= self.max_length
                inp = torch.tensor((context_enc + continuation_enc)[-(self.max_length + 1):][:-1],
                                   dtype=torch.long, device=self.device)
                inps.append(inp)
                cont_toks_list.append(continuation_enc)
                inplens.append(inp.shape[0])
            padding_len_inp = max(inplens)
            batched = pad_and_concat(padding_len_inp, inps, padding_side="right")
            multi_logits = self._mixture_logprobs(batched)          # [B, L, V] log-probabilities

            for (request_str, ctx_tokens, _), logits, inplen, cont_toks in zip(
                    chunk, multi_logits, inplens, cont_toks_list, strict=True):
                logits = logits[inplen - len(cont_toks):inplen].unsqueeze(0)  # [1, contlen, V], no padding
                greedy_tokens = logits.argmax(dim=-1)
                for request_str, cont_toks, logits in re_ord.get_cache(
                        req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=logits):
                    cont_toks = torch.tensor(cont_toks, dtype=torch.long, device=self.device).unsqueeze(0)
                    max_equal = (greedy_tokens[:, -cont_toks.shape[1]:] == cont_toks).all()
                    logits = torch.gather(logits, 2, cont_toks.unsqueeze(-1)).squeeze(-1)
                    answer = (float(logits.sum()), bool(max_equal))
                    res.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM.loglikelihood_rolling: disjoint rolling windows of max_length, scored batch_size at a time."""
        all_windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            windows = [(None,) + w for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            all_windows.extend(windows)
            counts.append(len(windows))
        scores = []
        for i in range(0, len(all_windows), self.batch_size):
            batch = all_windows[i:i + self.batch_size]
            scores.extend(ll for ll, _ in self._loglikelihood_tokens(batch))
        out, pos = [], 0
        for req, n in zip(requests, counts):
            total = sum(scores[pos:pos + n])
            pos += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, temperature-sampled) decoding from the mixture, one request at a
        time with a KV cache per member; stops at any `until` string, EOS or max_gen_toks (as HFLM)."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            temperature = float(kwargs.get("temperature") or 0.0)
            sample = bool(kwargs.get("do_sample")) and temperature > 0
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise LMEvalError(f"max_gen_toks={max_gen} leaves no room in max_length={self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=max_ctx) or [self.prefix_token_id]
            step_in = torch.tensor([ids], dtype=torch.long, device=self.device)
            pasts, gen = [None] * len(self._models), []
            for _ in range(max_gen):
                mix = None
                for j, lw in enumerate(self._log_w):
                    o = self._member_logits(j, step_in, past_key_values=pasts[j], use_cache=True)
                    pasts[j] = o.past_key_values
                    lp = F.log_softmax(o.logits[0, -1], dim=-1, dtype=torch.float32) + lw
                    mix = lp if mix is None else torch.logaddexp(mix, lp)
                if sample:
                    nxt = int(torch.multinomial(torch.softmax(mix / temperature, -1), 1))
                else:
                    nxt = int(mix.argmax())
                if nxt == self.eot_token_id:
                    break
                gen.append(nxt)
                text = self.tok_decode(gen)
                if any(s and s in text for s in until):
                    break
                step_in = torch.tensor([[nxt]], dtype=torch.long, device=self.device)
            text = postprocess_generated_text(self.tok_decode(gen), until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out


# --------------------------------------------------------------------------------------- running
def _task_manager(tasks, include_path=None):
    """TaskManager over our shipped tasks (+ include_path); lm_eval's ~7 s built-in index only if needed."""
    from lm_eval.tasks import TaskManager
    if include_path is None:
        include_path = []
    extra = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else [str(include_path)]
    paths = [str(TASKS_DIR)] + extra
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(isinstance(t, str) and t in tm.all_tasks for t in tasks):
        return tm
    return TaskManager(include_path=paths, include_defaults=True)


def compact_results(res: dict) -> dict:
    """{task: {metric: value}} from simple_evaluate's output. Only "metric,filter" entries are kept, the
    ",none" filter suffix is dropped; stderrs lm_eval could not compute ("N/A") and overflowed
    perplexities (inf) become None."""
    def num(v):
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None   # JSON has no inf
    return {task: {key.removesuffix(",none"): num(v) for key, v in metrics.items() if "," in key}
            for task, metrics in res["results"].items()}


def _evaluate(lm, tasks, include_path, limit, log_samples=False, **kw) -> dict:
    import lm_eval
    tasks = _as_list(tasks, str) if isinstance(tasks, (list, tuple)) else [t for t in str(tasks).split(",") if t]
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=_task_manager(tasks, include_path),
                                   limit=limit, log_samples=log_samples, **kw)


def _write_json(path, doc) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _summary(res, t0, limit, **head) -> dict:
    import lm_eval
    return {**head, "tasks": compact_results(res), "n_samples": {t: n.get("effective") for t, n in
                                                                 res.get("n-samples", {}).items()},
            "limit": limit, "lm_eval_version": getattr(lm_eval, "__version__", None),
            "seconds": round(time.time() - t0, 2)}


def run_lm_eval(run, k, tasks, include_path=None, limit=None, output=None, batch_size=4, device=None,
                **model_kw) -> dict:
    """Evaluate the top-K mixture of RUN on lm_eval tasks; write compact results to `output`
    (default RUN/lm_eval_k{K}.json) and return them:
    {"run", "k", "members", "weights", "tasks": {task: {metric: value}}, "n_samples", "limit", ...}."""
    t0 = time.time()
    lm = MixLM(run=run, k=k, batch_size=batch_size, device=device, **model_kw)
    res = _evaluate(lm, tasks, include_path, limit)
    doc = _summary(res, t0, limit, run=str(run), k=int(k), members=lm.member_ids, weights=lm.weights)
    _write_json(output or Path(run) / f"lm_eval_k{int(k)}.json", doc)
    return doc


def run_lm_eval_hf(snapshot_dir, tasks, include_path=None, limit=None, output=None, batch_size=4, device=None,
                   softmax_dtype="float32", **hf_kw) -> dict:
    """Evaluate one snapshot dir with lm_eval's own `hf` model (HFLM), for comparison with q0mix; the
    log-softmax runs in float32 as in q0mix. Writes `output` if given; returns the same compact form."""
    from lm_eval.models.huggingface import HFLM
    t0 = time.time()
    lm = HFLM(pretrained=str(snapshot_dir), batch_size=batch_size, device=_pick_device(device),
              softmax_dtype=softmax_dtype, **hf_kw)
    res = _evaluate(lm, tasks, include_path, limit)
    doc = _summary(res, t0, limit, model="hf", pretrained=str(snapshot_dir))
    if output:
        _write_json(output, doc)
    return doc


def main(argv=None) -> None:
    """lm_eval's CLI with q0mix registered (used by `python -m q0ds.lm_eval_adapter`); with --tasks and
    no --include_path, our shipped tasks dir is added as the include path."""
    import q0ds.lm_eval_adapter  # noqa: F401  (registers "q0mix")
    from lm_eval.__main__ import cli_evaluate
    args = sys.argv[1:] if argv is None else list(argv)
    flags = {a.split("=")[0] for a in args}
    if "--tasks" in flags and "--include_path" not in flags:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0]] + args
    cli_evaluate()


if __name__ == "__main__":
    main()

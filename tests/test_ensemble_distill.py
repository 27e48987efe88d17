"""Ensemble distillation: the mixture loss (pure), the ZeRO-3 mixture teacher (resident and swapped slots give
the same logits as the HF members), and `q0ds distill-ensemble` end to end: an HF-loadable student whose
snapshot.json names its teachers, a report, exact resume after a pre-emption and a kill, refusal of a changed
teacher. The population is real snapshots (write_snapshot + token_logprobs + fit-prior + eval) of tiny members
trained a few plain-torch steps each, which is much faster than a `q0ds run`."""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from q0ds.distill import distill_loss, mixture_distill_loss, mixture_logp


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def _labels(seed=7, shape=(2, 5), V=11):
    y = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    y[0, 0] = -100
    return y


# ---------------------------------------------------------------- the pure loss
@pytest.mark.parametrize("alpha,T", [(1.0, 1.0), (0.45, 1.2), (0.9, 2.0)])
def test_one_member_of_weight_one_is_distill_loss_exactly(alpha, T):
    s, t, y = _logits(0), _logits(1), _labels()
    ref, ref_parts = distill_loss(s, t, y, alpha, T)
    loss, parts = mixture_distill_loss(s, [t], [1.0], y, alpha, T)
    assert torch.equal(loss, ref) and torch.equal(parts["kl"], ref_parts["kl"]) and torch.equal(parts["ce"], ref_parts["ce"])


def test_mixture_matches_direct_computation_and_renormalises_weights():
    s, members, y = _logits(0), [_logits(1), _logits(2), _logits(3)], _labels()
    T, a = 1.5, 0.7
    w = torch.tensor([0.2, 0.5, 0.3])
    p_mix = sum(wi * F.softmax(z / T, -1) for wi, z in zip(w, members))
    keep = (y != -100).flatten()
    ref_kl = F.kl_div(F.log_softmax(s / T, -1).flatten(0, 1)[keep], p_mix.flatten(0, 1)[keep], reduction="batchmean")
    ref = (1 - a) * F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100) + a * T * T * ref_kl
    loss, parts = mixture_distill_loss(s, members, w, y, a, T)
    assert torch.allclose(parts["kl"], ref_kl, atol=1e-5) and torch.allclose(loss, ref, atol=1e-5)
    scaled, _ = mixture_distill_loss(s, iter(members), (w * 8).tolist(), y, a, T)      # unnormalised, a generator
    assert torch.allclose(scaled, loss, atol=1e-6)
    assert torch.allclose(mixture_logp(members, w, T).exp().sum(-1), torch.ones(2, 5), atol=1e-5)


def test_zero_weight_members_drop_out_and_identical_members_equal_one_teacher():
    s, t, u, y = _logits(0), _logits(1), _logits(2), _labels()
    one, _ = mixture_distill_loss(s, [t], [1.0], y, 0.9, 1.2)
    assert torch.equal(mixture_distill_loss(s, [t, u], [1.0, 0.0], y, 0.9, 1.2)[0], one)
    assert torch.allclose(mixture_distill_loss(s, [t, t, t], [0.1, 0.3, 0.6], y, 0.9, 1.2)[0], one, atol=1e-6)


def test_teachers_get_no_gradient_and_alpha_zero_runs_no_teacher():
    s = _logits(0).requires_grad_()
    members = [_logits(1).requires_grad_(), _logits(2).requires_grad_()]
    loss, _ = mixture_distill_loss(s, members, [0.5, 0.5], _labels(), 0.9, 1.2)
    loss.backward()
    assert all(m.grad is None for m in members) and s.grad.abs().sum() > 0

    def never():
        raise AssertionError("alpha=0 must not run the teacher")
        yield
    ce, parts = mixture_distill_loss(s, never(), [1.0], _labels(), 0.0, 1.2)
    assert torch.equal(ce, distill_loss(s, None, _labels(), 0.0, 1.2)[0]) and parts["kl"] == 0


def test_bad_weights_are_refused():
    t = _logits(1)
    for weights in ([], [-0.5, 1.5], [0.0, 0.0]):
        with pytest.raises(ValueError, match="weights"):
            mixture_logp([t, t][:max(1, len(weights))], weights, 1.0)
    with pytest.raises(ValueError, match="2 mixture weights for 1 members"):
        mixture_logp([t], [0.5, 0.5], 1.0)
    with pytest.raises(ValueError, match="1 mixture weights for more members"):
        mixture_logp([t, t], [1.0], 1.0)


def test_options_are_checked():
    from q0ds.config import ConfigError
    from q0ds.ensemble_distill import _split_options
    opts, rest = _split_options(["ensemble.init=top1", "ensemble.max_engines=2", "distill.alpha=0.5"])
    assert opts == {"init": "top1", "max_engines": 2, "teacher_cache": 0, "teacher_cache_dtype": "float16"}
    assert rest == ["distill.alpha=0.5"]
    opts, _ = _split_options(["ensemble.init=avg", "ensemble.teacher_cache=32", "ensemble.teacher_cache_dtype=float32"])
    assert (opts["init"], opts["teacher_cache"], opts["teacher_cache_dtype"]) == ("avg", 32, "float32")
    for bad in ("ensemble.init=best", "ensemble.max_engines=0", "ensemble.max_engines=x", "ensemble.k=3",
                "ensemble.teacher_cache=-1", "ensemble.teacher_cache_dtype=bfloat16"):
        with pytest.raises(ConfigError, match="ensemble"):
            _split_options([bad])


def test_weight_average_refuses_members_of_several_bases():
    from q0ds.config import ConfigError
    from q0ds.ensemble_distill import check_one_trajectory
    check_one_trajectory(["base-00/cycle-0003", "base-00/cycle-0001"])
    with pytest.raises(ConfigError, match=r"2 bases \(base-00, base-03\): use ensemble.init=top1 or a K whose"):
        check_one_trajectory(["base-00/cycle-0003", "base-03/cycle-0001", "base-00/cycle-0002"])


# ---------------------------------------------------------------- the teacher cache's files (no engines)
def _fake_stream(start, n, L=6, V=13):
    """Window k of a fake stream: a deterministic function of k alone."""
    k = torch.arange(start, start + n)[:, None]
    return (k * 7 + torch.arange(L + 1) * 3) % V


def _fake_teacher(calls):
    def logp(inputs):
        calls.append(inputs.shape[0])
        return F.log_softmax(torch.sin(inputs[..., None].float() * torch.arange(1, 14)) * 4, -1)
    return logp


@pytest.mark.parametrize("world", [1, 2])
def test_teacher_cache_shards_read_back_by_sample_across_shards(tmp_path, monkeypatch, world):
    """7 samples in shards of 3: every rank runs the same number of teacher forwards, any read (also one that
    straddles two shards) returns the truncation of the teacher on exactly those windows; a read of other
    windows, a changed key or a missing shard is refused naming the file."""
    from q0ds import teacher_cache as C
    from q0ds.config import ConfigError
    from q0ds.distill import truncate_logp
    monkeypatch.setattr(C, "SHARD_BYTES", 3 * 6 * (6 * 4 + 8))
    spec = {"k": 2, "members": ["base-00/cycle-0001", "base-00/cycle-0000"], "member_sha256": ["a", "b"],
            "weights": [0.6, 0.4], "temperature": 1.0}
    key = C.cache_key(4, spec, "float32", "data-fp", 3000, 6, samples=7, steps=3)
    assert key["shard_samples"] == 3
    calls = {r: [] for r in range(world)}
    for rank in reversed(range(world)):               # rank 0 last: it writes the header once all shards exist
        header = C.build(tmp_path, key, _fake_stream, _fake_teacher(calls[rank]), batch=2, rank=rank, world=world)
    assert [s["file"] for s in header["shards"]] == [C.shard_name(i) for i in range(3)]
    assert len({len(c) for c in calls.values()}) == 1                  # the same number of forwards per rank
    reader = C.CacheReader(tmp_path, C.read_header(tmp_path, key))
    for start, n in ((0, 7), (2, 3), (5, 2), (4, 1)):
        got = reader.read(start, _fake_stream(start, n)[:, :-1])
        ref = truncate_logp(_fake_teacher([])(_fake_stream(start, n)[:, :-1]), 4)
        assert torch.equal(got.top_logp, ref.top_logp) and torch.equal(got.top_ids, ref.top_ids.int())
        assert torch.equal(got.log_rest, ref.log_rest)
    with pytest.raises(ConfigError, match="other windows than samples 2..4"):
        reader.read(2, _fake_stream(3, 3)[:, :-1])
    with pytest.raises(ConfigError, match="holds samples 0..6"):
        reader.read(6, _fake_stream(6, 2)[:, :-1])
    with pytest.raises(ConfigError, match=f"{tmp_path / 'header.json'}.*n differ.*delete"):
        C.read_header(tmp_path, dict(key, n=5))
    (tmp_path / C.shard_name(1)).unlink()
    with pytest.raises(ConfigError, match="shard-00001.safetensors is missing"):
        C.read_header(tmp_path, key)


# ---------------------------------------------------------------- a tiny population
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module", autouse=True)
def _no_inherited_rendezvous():
    """engine.setup_distributed() writes RANK/MASTER_PORT into os.environ of this process (here, or earlier in
    the session by test_engine.py); a `q0ds` subprocess inheriting them would try to serve this process's port."""
    saved = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}
    yield
    for k in DIST_ENV:
        os.environ.pop(k, None)
    os.environ.update(saved)


@pytest.fixture
def in_process():
    from q0ds import engine as E
    E.setup_distributed()
    yield E
    for k in DIST_ENV:
        os.environ.pop(k, None)


@pytest.fixture(scope="module")
def population(tmp_path_factory, embedded_data):
    """RUN with 3 real snapshots (1 base x 3 cycles), each trained a few steps from its own seed, scored,
    then `fit-prior` and `eval` as usual."""
    from q0ds.config import load_config, save_config
    from q0ds.data import PreparedData
    from q0ds.model import build_config, build_model
    from q0ds.population import eval_run, fit_prior_run
    from q0ds.presets import preset_config
    from q0ds.snapshot import snapshot_dir, token_logprobs, windows_fingerprint, write_scores, write_snapshot
    run = tmp_path_factory.mktemp("ens") / "run"
    cfg = load_config(None, ["schedule.cycles=3", "schedule.cycle_steps=3", "distill.start_cycle=1"],
                      base=preset_config("tiny", data=str(embedded_data), run_dir=str(run)))
    save_config(cfg, run / "config.json")
    data = PreparedData.open(cfg.data)
    mc = build_config(cfg.model, data.vocab_size, data.eos_id, data.pad_id, cfg.train.seq_len)
    val, fit = data.eval_windows("val", cfg.train.seq_len), data.eval_windows("fitness", cfg.train.seq_len)
    for cycle in range(3):
        model = build_model(mc, seed=cycle)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(2 + 3 * cycle):
            w = data.train_samples(cfg.seed, cycle, step * 8, 8, cfg.train.seq_len)
            loss = model(input_ids=w[:, :-1], labels=w[:, :-1]).loss      # HF shifts labels itself
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        snap = snapshot_dir(run / "bases" / "base-00", cycle)
        meta = {"base": 0, "cycle": cycle, "step": 3 * (cycle + 1), "epoch": 0.1 * (cycle + 1),
                "fitness_fingerprint": windows_fingerprint(fit), "val_fingerprint": windows_fingerprint(val)}
        write_snapshot(snap, model.state_dict(), mc, data.tokenizer_dir, meta)
        with torch.no_grad():
            scores = {"val": token_logprobs(model, *val, batch=16), "fitness": token_logprobs(model, *fit, batch=16)}
        write_scores(snap, {k: v.exp() for k, v in scores.items()}, {"val_loss": -scores["val"].double().mean().item()})
    fit_prior_run(run)
    eval_run(run, ks=[1, 2, 3])
    return run


def _final(out: Path) -> Path:
    return sorted((out / "bases" / "base-00" / "snapshots").glob("cycle-*"))[-1]


def test_mixture_teacher_resident_or_swapped_gives_the_members_logits(population, in_process):
    """Slot count changes memory, not numbers: 2 resident engines and 1 swapped engine both yield exactly the
    logits of the HF members, in member order."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from q0ds.config import load_config
    from q0ds.ensemble_distill import MixtureTeacher, member_dir
    E = in_process
    prior = json.loads((population / "prior.json").read_text())
    snaps = [member_dir(population, m) for m in prior["topk"]["2"]["members"]]
    cfg = load_config(population / "config.json")
    ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1)
    mc = AutoConfig.from_pretrained(snaps[0])
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [AutoModelForCausalLM.from_pretrained(s).eval()(input_ids=ids).logits for s in snaps]
    import deepspeed
    from q0ds.model import build_model
    student, _ = E.make_student(build_model(mc, 1), ds, cfg.optim, lambda s: (0.0, 0.0))   # replicas copy its buffers
    for mode in ("zero3", "replicated"):
        for slots, loads_after in ((2, 2), (1, 4)):      # swapped: m0 at start, then m1, m0, m1
            teacher = MixtureTeacher(snaps, mc, ds, slots, seed=0, mode=mode, student=student)
            assert all(isinstance(e, deepspeed.DeepSpeedEngine) == (mode == "zero3") for e in teacher.engines)
            for _ in range(2):
                got = list(teacher.member_logits(ids))
                assert len(got) == 2 and all(torch.equal(g, r) for g, r in zip(got, ref)), (mode, slots)
            assert teacher.loads == loads_after
            assert torch.is_grad_enabled()           # the generator left no_grad behind it


def test_student_init_from_a_snapshot_lands_in_the_fp32_master(population, in_process):
    from safetensors.torch import load_file
    from q0ds.config import load_config
    from q0ds.data import PreparedData
    from q0ds.model import build_config, build_model
    E = in_process
    cfg = load_config(population / "config.json", ["optim.lr=1e-9", "optim.weight_decay=0", "train.grad_clip=0"])
    data = PreparedData.open(cfg.data)
    mc = build_config(cfg.model, data.vocab_size, data.eos_id, data.pad_id, cfg.train.seq_len)
    ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1)
    eng, _ = E.make_student(build_model(mc, 123), ds, cfg.optim, lambda s: (0.0, 0.0))
    sd = load_file(population / "bases/base-00/snapshots/cycle-0002/model.safetensors")
    E.set_trained_weights_(eng, sd)
    ids = torch.randint(0, 500, (4, 16))
    E.micro_step(eng, eng(input_ids=ids, labels=ids).loss, 1, last=True)     # lr 0: the step must keep them
    after = E.full_fp32_params(eng)
    assert all(torch.equal(after[n], sd[n]) for n in sd)
    import deepspeed
    p = dict(eng.module.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    with deepspeed.zero.GatheredParameters([p]):
        assert torch.equal(p.data, sd["model.layers.0.mlp.up_proj.weight"])


# ---------------------------------------------------------------- end to end (subprocesses, 1 rank)
STUDENT = ["schedule.cycles=2", "schedule.cycle_steps=3", "schedule.warmup_steps=2"]


@pytest.fixture(scope="module")
def distilled(population):
    p = run_cli("distill-ensemble", "--run", population, "--k", "2", *STUDENT)
    return population / "distilled" / "k2", p.stdout


@pytest.mark.slow
def test_distilled_student_is_an_hf_model_naming_its_teachers(population, distilled):
    from transformers import AutoModelForCausalLM
    out, stdout = distilled
    prior = json.loads((population / "prior.json").read_text())
    snap = _final(out)
    meta = json.loads((snap / "snapshot.json").read_text())
    src = meta["distilled_from"]
    assert src["k"] == 2 and src["run"] == str(population.resolve())
    assert src["members"] == prior["topk"]["2"]["members"] and src["weights"] == pytest.approx(prior["topk"]["2"]["weights"])
    assert len(src["member_sha256"]) == 2 and meta["distilled"] and meta["scored"] and meta["cycle"] == 1
    assert meta["teachers"] == [{"member": m, "weight": w, "sha256": h} for m, w, h in
                                zip(src["members"], src["weights"], src["member_sha256"])]
    assert src["member_sha256"] == [json.loads((population / "bases/base-00/snapshots" / m.split("/")[1] /
                                                "snapshot.json").read_text())["sha256"] for m in src["members"]]
    recipe = meta["recipe"]
    assert recipe["command"] == f"q0ds distill-ensemble --run {population.resolve()} --k 2"
    assert (recipe["alpha"], recipe["temperature"], recipe["init"]) == (0.9, 1.0, "top1")
    assert recipe["schedule"] == {"shape": "cosine", "cycles": 2, "cycle_epochs": 1.0, "cycle_steps": 3,
                                  "warmup_steps": 2}
    assert recipe["seed"] == meta["seed"] and recipe["run_config"] == meta["run_config"]
    model = AutoModelForCausalLM.from_pretrained(snap, local_files_only=True)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["schedule"]["shape"] == "cosine" and not cfg["perturb"]["enabled"] and not cfg["distill"]["enabled"]
    rep = json.loads((out / "distill_report.json").read_text())
    ev = json.loads((population / "eval.json").read_text())
    assert rep["val_loss"]["mixture"] == next(r["weighted"] for r in ev["topk"] if r["k"] == 2)
    assert rep["val_loss"]["best_single"] == ev["best_single"]["val_loss"]
    assert rep["val_loss"]["distilled"] == meta["val_loss"] and rep["complete"] and rep["same_val_set"]
    assert rep["cost"]["steps"] == 6 and rep["cost"]["student_epochs"] == meta["epoch"]
    assert (out / "distill_report.png").stat().st_size > 5000
    assert "distilled student" in stdout and "gain retained" in stdout
    assert f"student initialised from {src['members'][0]}" in stdout and rep["init"] == "top1"    # the default
    from q0ds.ensemble_distill import distill_summary
    assert distill_summary(population, 2)["val_loss"] == rep["val_loss"]


@pytest.mark.slow
def test_resume_after_preemption_and_kill_is_exact_with_swapped_teachers(population, distilled, tmp_path):
    """Pre-empt at step 2 (exit 75), SIGKILL at step 5 (resume from the step-4 checkpoint), finish: same final
    weights as the uninterrupted run, although this one holds a single teacher engine and swaps members."""
    out, _ = distilled
    other = tmp_path / "student"
    args = ["distill-ensemble", "--run", population, "--k", "2", *STUDENT, f"run_dir={other}", "ensemble.max_engines=1"]
    assert run_cli(*args, env={"Q0DS_FAULT": "preempt_at_step=2"}, check=False).returncode == 75
    assert run_cli(*args, env={"Q0DS_FAULT": "crash_at_step=5"}, check=False).returncode == -9
    p = run_cli(*args)
    assert "resumed base 0 from step-00000004" in p.stdout
    ref, got = _final(out), _final(other)
    assert json.loads((got / "snapshot.json").read_text())["sha256"] == json.loads((ref / "snapshot.json").read_text())["sha256"]
    losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, (d / "bases/base-00/metrics.jsonl").read_text().splitlines())
                        if "loss" in r]
    assert losses(other) == losses(out)


@pytest.mark.slow
def test_a_changed_teacher_or_bad_k_is_refused(population, distilled, tmp_path):
    out, _ = distilled
    before = (out / "teacher.json").read_text()
    prior_path = population / "prior.json"
    saved = prior_path.read_text()
    prior = json.loads(saved)
    prior["weights"] = list(reversed(prior["weights"]))           # as if the prior had been refitted differently
    prior_path.write_text(json.dumps(prior))
    try:
        p = run_cli("distill-ensemble", "--run", population, "--k", "2", *STUDENT, check=False)
    finally:
        prior_path.write_text(saved)
    assert p.returncode == 2 and "records a different teacher" in p.stderr and "Traceback" not in p.stderr
    assert (out / "teacher.json").read_text() == before
    p = run_cli("distill-ensemble", "--run", population, "--k", "9", check=False)
    assert p.returncode == 2 and "larger than the population" in p.stderr
    p = run_cli("distill-ensemble", "--run", tmp_path, "--k", "2", check=False)
    assert p.returncode == 2 and "prior.json" in p.stderr


@pytest.mark.slow
def test_q0ds_eval_and_lm_eval_accept_the_student(distilled, tmp_path):
    """The student dir is a run of its own: `fit-prior` + `eval` score its snapshots, `lm-eval --k 1` its best."""
    import shutil
    out, _ = distilled
    student = tmp_path / "student"
    shutil.copytree(out, student, ignore=shutil.ignore_patterns("checkpoints"))
    run_cli("fit-prior", "--run", student)
    run_cli("eval", "--run", student, "--k", "1,2")
    ev = json.loads((student / "eval.json").read_text())
    final = json.loads((_final(student) / "snapshot.json").read_text())
    assert [r["k"] for r in ev["topk"]] == [1, 2] and final["val_loss"] in [
        json.loads((d / "snapshot.json").read_text())["val_loss"] for d in (student / "bases/base-00/snapshots").iterdir()]
    p = run_cli("lm-eval", "--run", student, "--k", "1", "--tasks", "q0ds_ppl", "--limit", "2")
    assert "q0ds_ppl" in p.stdout


# ---------------------------------------------------------------- ensemble.init=avg and ensemble.teacher_cache
@pytest.fixture(scope="module")
def mixed(population, tmp_path_factory):
    """The population's fitted prior puts all its weight on one member; this copy of the run (its snapshots
    linked) has the prior 0.2 / 0.3 / 0.5, so the top-2 and top-3 mixtures are real mixtures."""
    import math
    import shutil
    run = tmp_path_factory.mktemp("mixed") / "run"
    run.mkdir()
    shutil.copy(population / "config.json", run / "config.json")
    (run / "bases").symlink_to(population / "bases")
    prior = json.loads((population / "prior.json").read_text())
    prior.update(weights=[0.2, 0.3, 0.5], logits=[math.log(w) for w in (0.2, 0.3, 0.5)])
    (run / "prior.json").write_text(json.dumps(prior))
    return run


def test_avg_init_is_the_weighted_float64_average_of_the_members(mixed, in_process, tmp_path):
    """Step-0 fp32 master of an init=avg student == sum_i w_i * member_i computed by hand in float64, cast to fp32."""
    from safetensors.torch import load_file
    from q0ds.ensemble_distill import EnsembleDistillTrainer, member_dir, resolve
    E = in_process
    cfg, spec, opts = resolve(mixed, 3, [*STUDENT, "ensemble.init=avg", f"run_dir={tmp_path / 'avg'}"])
    trainer = EnsembleDistillTrainer(cfg, spec, opts)
    trainer._resume()
    got = E.full_fp32_params(trainer.student)
    members = [load_file(member_dir(mixed, m) / "model.safetensors") for m in spec["members"]]
    w = spec["weights"]
    assert w == [0.5, 0.3, 0.2] and spec["init"] == "avg"
    for name, value in got.items():
        ref = (w[0] * members[0][name].double() + w[1] * members[1][name].double()
               + w[2] * members[2][name].double()).float()
        assert torch.equal(value, ref), name
        assert not torch.equal(value, members[0][name])


def test_avg_init_refuses_a_top_k_from_several_bases(population, tmp_path):
    import shutil
    from q0ds.config import ConfigError
    from q0ds.ensemble_distill import resolve
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(population / "config.json", run / "config.json")
    prior = json.loads((population / "prior.json").read_text())
    prior["members"] = [m.replace("base-00/cycle-0000", "base-01/cycle-0000") for m in prior["members"]]
    (run / "prior.json").write_text(json.dumps(prior))
    with pytest.raises(ConfigError, match=r"3 bases|2 bases \(base-00, base-01\)"):
        resolve(run, 3, ["ensemble.init=avg"])


def _losses(out: Path):
    return [(r["step"], r["loss"], r["kl"]) for r in
            map(json.loads, (out / "bases/base-00/metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_a_cache_of_the_whole_vocab_gives_the_on_the_fly_losses(mixed, tmp_path):
    out, cached = tmp_path / "on_the_fly", tmp_path / "cached"
    run_cli("distill-ensemble", "--run", mixed, "--k", "2", *STUDENT, f"run_dir={out}")
    p = run_cli("distill-ensemble", "--run", mixed, "--k", "2", *STUDENT, f"run_dir={cached}",
                "ensemble.teacher_cache=512", "ensemble.teacher_cache_dtype=float32")
    assert "teacher cache: computing the mixture's top-512 for 48 windows" in p.stdout
    ref, got = _losses(out), _losses(cached)
    assert len(got) == len(ref) == 6 and [s for s, *_ in got] == [s for s, *_ in ref]
    for (_, l1, k1), (_, l2, k2) in zip(ref, got):
        assert abs(l1 - l2) < 1e-5 and abs(k1 - k2) < 1e-5
    assert json.loads((_final(cached) / "snapshot.json").read_text())["val_loss"] == pytest.approx(
        json.loads((_final(out) / "snapshot.json").read_text())["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_a_small_cache_trains_resumes_exactly_from_the_same_file_and_refuses_a_tampered_header(mixed, tmp_path):
    """N=4 (fp16): uninterrupted vs pre-empted at step 2 and relaunched: the relaunch reuses the cache file (same
    mtime, no recomputation) and ends on the same weights; the snapshot's recipe records the cache."""
    common = ["distill-ensemble", "--run", mixed, "--k", "2", *STUDENT, "ensemble.teacher_cache=4"]
    ref, other = tmp_path / "ref", tmp_path / "other"
    run_cli(*common, f"run_dir={ref}")
    shard = other / "teacher_cache" / "shard-00000.safetensors"
    assert run_cli(*common, f"run_dir={other}", env={"Q0DS_FAULT": "preempt_at_step=2"}, check=False).returncode == 75
    mtime = shard.stat().st_mtime_ns
    p = run_cli(*common, f"run_dir={other}")
    assert "teacher cache: reusing" in p.stdout and "computing" not in p.stdout and shard.stat().st_mtime_ns == mtime
    assert "resumed base 0 from step-00000002" in p.stdout
    meta = json.loads((_final(other) / "snapshot.json").read_text())
    assert meta["sha256"] == json.loads((_final(ref) / "snapshot.json").read_text())["sha256"]
    assert _losses(other) == _losses(ref) and all(kl > 0 for *_, kl in _losses(ref))
    assert meta["recipe"]["teacher_cache"] == 4 and meta["recipe"]["teacher_cache_dtype"] == "float16"
    assert "top-4 of p_mix" in meta["recipe"]["loss"] and meta["distilled_from"]["teacher_cache"] == 4
    header = other / "teacher_cache" / "header.json"
    h = json.loads(header.read_text())
    assert (h["n"], h["k"], h["dtype"], h["samples"], h["steps"]) == (4, 2, "float16", 48, 6)
    h["samples"] = 40
    header.write_text(json.dumps(h))
    p = run_cli(*common, f"run_dir={other}", check=False)
    assert p.returncode == 2 and f"teacher cache {header} does not match this launch (samples differ)" in p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- the truncation's error on the run's own windows
def test_truncation_error_on_the_students_first_windows_shrinks_with_n(mixed, population):
    """distill_approx.measure_truncation on the real top-2 mixture (weights 0.5 / 0.3 renormalised): the exact
    KL recomputed here by hand from the HF members on the student's first train windows; the error and the
    uncovered mass shrink as N grows, and N = vocab is the full KL (error ~0, gradient cosine 1). A prior with all
    its weight on the top member (the population's own) leaves the ratios undefined."""
    from transformers import AutoModelForCausalLM
    from q0ds.config import ConfigError, load_config
    from q0ds.data import PreparedData
    from q0ds.distill_approx import measure_truncation
    from q0ds.ensemble_distill import SEED_OFFSET, member_dir
    cfg = load_config(mixed / "config.json")
    V = PreparedData.open(cfg.data).vocab_size
    ns = [2, 8, 32, 128, V]
    r = measure_truncation(mixed, 2, ns, windows=6, repeats=2)
    assert json.loads(json.dumps(r)) == r and r["tokens"] == 6 * cfg.train.seq_len and r["vocab"] == V
    assert r["members"] == ["base-00/cycle-0002", "base-00/cycle-0001"] and r["weights"] == pytest.approx([0.625, 0.375])

    win = PreparedData.open(cfg.data).train_samples(cfg.seed + SEED_OFFSET, 0, 0, 6, cfg.train.seq_len)
    with torch.no_grad():
        z = [AutoModelForCausalLM.from_pretrained(member_dir(mixed, m)).eval()(input_ids=win[:, :-1]).logits.double()
             for m in r["members"]]
    p_mix = 0.625 * F.softmax(z[0], -1) + 0.375 * F.softmax(z[1], -1)
    exact = (p_mix * (p_mix.log() - F.log_softmax(z[0], -1))).sum(-1).mean().item()
    assert r["exact_kl"] == pytest.approx(exact, rel=1e-4) and exact > 1e-3

    by = [r["by_n"][str(n)] for n in ns]
    rel, mass = [b["relative_error"] for b in by], [b["mass_mean"] for b in by]
    assert all(a > b for a, b in zip(rel, rel[1:])) and rel[0] > 0.01, rel
    assert all(a < b for a, b in zip(mass, mass[1:])) and mass[-1] == pytest.approx(1.0, abs=1e-6)
    assert rel[-1] < 1e-4 and by[-1]["grad_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert by[0]["grad_cosine"] < by[-2]["grad_cosine"] <= 1 + 1e-6
    assert all(b["cache_bytes_per_token"] > 6 * n for b, n in zip(by, ns))
    t = r["timing"]
    assert t["micro_batch"] == cfg.train.micro_batch and t["on_the_fly"]["loss_s"]["median"] > 0
    assert set(t["cached"]) == {str(n) for n in ns} and all(c["loss_s"]["min"] > 0 for c in t["cached"].values())

    assert r["undefined"] is None
    # the population's own prior puts all its weight on one member: the teacher is the student's start
    d = measure_truncation(population, 2, [8], windows=2, repeats=1)
    assert d["exact_kl"] < 1e-6 and "undefined" in d["undefined"]
    assert d["by_n"]["8"]["relative_error"] is None and d["by_n"]["8"]["grad_cosine"] is None

    with pytest.raises(ValueError, match=f"every N must be in 1..{V}"):
        measure_truncation(mixed, 2, [V + 1], windows=1, repeats=1)
    with pytest.raises(ConfigError, match="init=top1"):
        measure_truncation(mixed, 2, [2], windows=1, repeats=1, overrides=["ensemble.init=avg"])

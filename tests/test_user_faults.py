"""Faults users hit around the trainer (issue 15, items 4 and 5): file modes on shared clusters, a failed
launch that must leave a run dir the corrected relaunch accepts, a read-only run dir, odd input files,
over-long prompts, a snapshot without fitness scores, the shipped corpus and the CLI's preset list."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

TINY = ["schedule.cycles=1", "schedule.cycle_steps=2", "train.ckpt_every=2"]


def q0ds(capsys, *args):
    """The `q0ds` CLI in this process (its real main(): argument parsing, error line, exit code) ->
    (exit code, stdout, stderr). Saves a subprocess's torch/transformers import for commands that do not
    start DeepSpeed."""
    from q0ds.cli import main
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_written_files_get_umask_modes(embedded_data, tmp_path, umask_027):
    """Before: prepare's data dir was 0700 (mkdtemp) and snapshot/score safetensors 0600, prior.json 0600
    (mkstemp) whatever the umask. After: 0o777/0o666 & ~umask, like any plain mkdir/open."""
    from q0ds.data import prepare
    from q0ds.prior import fit_prior, write_prior_json
    import torch
    from q0ds.corpus import embedded_documents
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("\n\n".join(embedded_documents()[:30]))
    out = tmp_path / "data"
    prepare(out, input=docs, vocab_size=300, fitness_tokens=200, val_tokens=200)
    assert mode(out) == 0o750
    assert {mode(p) for p in out.rglob("*") if p.is_file()} == {0o640}

    snap = _write_member(embedded_data, tmp_path / "run", 0)
    from q0ds.snapshot import write_scores
    write_scores(snap, {"fitness": torch.rand(10), "val": torch.rand(10)}, {"val_loss": 1.0})
    assert {p.name: mode(p) for p in snap.glob("*.safetensors")} == {
        "model.safetensors": 0o640, "fitness.safetensors": 0o640, "val.safetensors": 0o640}
    assert mode(snap) == 0o750
    write_prior_json(tmp_path / "prior.json", ["a", "b"], fit_prior(torch.rand(2, 50), steps=2))
    assert mode(tmp_path / "prior.json") == 0o640


def _write_member(data_dir, run: Path, cycle: int, seed: int = 0) -> Path:
    """A real snapshot (the trainer's writer, an untrained tiny model) at RUN/bases/base-00/snapshots/."""
    from q0ds.config import RunConfig
    from q0ds.data import PreparedData
    from q0ds.model import build_config, build_model
    from q0ds.snapshot import snapshot_dir, write_snapshot
    data = PreparedData.open(data_dir)
    cfg = RunConfig(data=str(data_dir))
    cfg.model.preset = "tiny"
    mc = build_config(cfg.model, data.vocab_size, data.eos_id, data.meta.get("pad_id", data.eos_id), 32)
    model = build_model(mc, seed)
    out = snapshot_dir(run / "bases" / "base-00", cycle)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_snapshot(out, model.state_dict(), mc, Path(data_dir) / "tokenizer",
                   {"base": 0, "cycle": cycle, "epoch": float(cycle + 1), "seed": seed})
    return out


def test_failed_launch_leaves_run_dir_that_the_fixed_relaunch_accepts(make_config, tmp_path):
    """Before: a ds_config that is a directory said "not found", and a bad ds_config was written into
    config.json first (with the base dir), so the corrected relaunch was refused as "a different config".
    After: the directory is named as such, nothing is created until DeepSpeed accepted the config, and the
    corrected relaunch trains."""
    path, cfg = make_config(*TINY)
    run = Path(cfg.run_dir)
    good = json.loads(path.read_text())
    bad = str(ROOT / "ds_configs")
    path.write_text(json.dumps(dict(good, ds_config=bad)))
    p = run_cli("train", "--config", path, check=False)
    assert p.returncode == 2 and f"{bad} is a directory" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not run.exists(), sorted(map(str, run.rglob("*")))
    rejected = tmp_path / "rejected.hjson"           # parses, but DeepSpeed itself refuses it at initialize
    rejected.write_text((ROOT / "ds_configs/zero3_cpu.hjson").read_text().replace("stage: 3", "stage: 3\n    no_such_key: 1"))
    path.write_text(json.dumps(dict(good, ds_config=str(rejected))))
    p = run_cli("train", "--config", path, check=False)
    assert p.returncode != 0
    assert not (run / "config.json").exists() and not (run / "bases").exists(), sorted(map(str, run.rglob("*")))
    path.write_text(json.dumps(good))
    run_cli("train", "--config", path)
    assert (run / "bases/base-00/done.json").is_file()


def _read_only_cmd(run_dir: Path, cmd: list) -> list:
    """CMD with RUN_DIR read-only: chmod for a normal user; as root (which ignores modes) a read-only bind
    mount in a private mount namespace (unshare), so nothing outside the test changes."""
    if os.geteuid() != 0:
        run_dir.chmod(0o555)
        return cmd
    if not shutil.which("unshare"):
        pytest.skip("running as root without unshare: cannot make a read-only directory")
    d = str(run_dir)
    script = f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && exec "$@"'
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.decode()[-200:]}")
    return ["unshare", "--mount", "sh", "-c", script, "sh", *cmd]


def test_read_only_run_dir_is_one_clear_error(make_config, tmp_path):
    """Before: a Python traceback from rank 0 and no q0ds error line. After: exit 2 and one line naming
    the run dir and the fix."""
    path, cfg = make_config(*TINY)
    run = Path(cfg.run_dir)
    run.mkdir()
    cmd = _read_only_cmd(run, [sys.executable, "-m", "q0ds.cli", "train", "--config", str(path)])
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600, env=dict(os.environ))
    if os.geteuid() != 0:
        run.chmod(0o755)
    err = [l for l in p.stderr.splitlines() if l.startswith("q0ds train: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(err) == 1 and str(run) in err[0] and "writable" in err[0], p.stderr[-3000:]
    assert not any(run.iterdir())


def _corpus_dir(tmp_path, embedded_data_docs):
    d = tmp_path / "corpus"
    d.mkdir()
    half = len(embedded_data_docs) // 2
    (d / "a.txt").write_text("\n\n".join(embedded_data_docs[:half]))
    return d, "\n\n".join(embedded_data_docs[half:])


def test_prepare_names_the_bad_file_and_reads_extensionless_text(tmp_path, capsys):
    """Before: one latin-1 file in a directory made prepare name another, good file (the first of its
    group), and an extensionless plain-text file was refused. After: the bad file is named with the byte
    offset; extensionless UTF-8 text is read as text; an extensionless binary file is named."""
    from q0ds.corpus import embedded_documents
    from q0ds.data import prepare
    docs = embedded_documents()[:24]
    d, rest = _corpus_dir(tmp_path, docs)
    (d / "b.txt").write_bytes("caf\u00e9 cr\u00e8me. ".encode("latin-1") * 50)
    code, _, err = q0ds(capsys, "prepare", "--input", d, "--out", tmp_path / "out")
    assert code == 2 and str(d / "b.txt") in err and "not UTF-8" in err and str(d / "a.txt") not in err, err

    (d / "b.txt").unlink()
    (d / "NOTES").write_text(rest)                   # plain text, no extension
    meta = prepare(tmp_path / "out", input=d, vocab_size=300, fitness_tokens=500, val_tokens=500)
    (d / "NOTES").rename(d / "NOTES.txt")           # the same text with an extension gives the same data
    same = prepare(tmp_path / "out3", input=d, vocab_size=300, fitness_tokens=500, val_tokens=500)
    assert (meta["n_docs"], meta["data_fingerprint"]) == (same["n_docs"], same["data_fingerprint"])
    (d / "NOTES.txt").unlink()

    (d / "blob").write_bytes(bytes(range(256)) * 4)
    code, _, err = q0ds(capsys, "prepare", "--input", d, "--out", tmp_path / "out2")
    assert code == 2 and str(d / "blob") in err and ".txt" in err, err


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, embedded_data):
    """A run dir with config.json and two unscored real snapshots of base 0, scored by `q0ds rescore`."""
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config
    run = tmp_path_factory.mktemp("faults") / "run"
    cfg = load_config(None, TINY, base=preset_config("tiny", data=str(embedded_data), run_dir=str(run)))
    save_config(cfg, run / "config.json")
    for c in (0, 1):
        _write_member(embedded_data, run, c, seed=c)
    from q0ds.population import rescore_run
    assert rescore_run(run) == ["base-00/cycle-0000", "base-00/cycle-0001"]
    return run, cfg


def test_rescore_matches_trainer_scoring(scored_run, embedded_data):
    """`q0ds rescore` stores what the trainer's scoring stores: p(true token) on both sets, the fingerprints
    and val loss; the scores equal a direct computation with the loaded model."""
    import torch
    from transformers import AutoModelForCausalLM
    from q0ds.data import PreparedData
    from q0ds.snapshot import load_scores, read_meta, token_logprobs, windows_fingerprint
    run, cfg = scored_run
    snap = run / "bases/base-00/snapshots/cycle-0001"
    meta = read_meta(snap)
    val = PreparedData.open(embedded_data).eval_windows("val", cfg.train.seq_len)
    model = AutoModelForCausalLM.from_pretrained(snap).eval()
    lp = token_logprobs(model, *val, batch=cfg.eval.batch)
    assert meta["scored"] and meta["val_fingerprint"] == windows_fingerprint(val)
    assert torch.equal(load_scores(snap, "val"), lp.exp())
    assert meta["val_loss"] == pytest.approx(-lp.double().mean().item(), rel=1e-12)


def test_fit_prior_without_fitness_file_gives_the_command(scored_run, tmp_path, capsys):
    """Before: fit-prior said the fitness file was missing but not what to do. After: it prints the exact
    `q0ds rescore` command (or how to exclude the snapshot), and running that command fixes it."""
    run, _ = scored_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "bases/base-00/snapshots/cycle-0001/fitness.safetensors").unlink()
    code, _, err = q0ds(capsys, "fit-prior", "--run", copy)
    cmd = f"q0ds rescore --run {copy} --member base-00/cycle-0001"
    assert code == 2 and cmd in err and "exclude" in err, err
    code, out, _ = q0ds(capsys, *cmd.split()[1:])
    assert code == 0 and "rescored base-00/cycle-0001" in out
    assert q0ds(capsys, "fit-prior", "--run", copy)[0] == 0
    assert json.loads((copy / "prior.json").read_text())["members"] == ["base-00/cycle-0000", "base-00/cycle-0001"]


def test_generate_keeps_last_seq_len_tokens_of_a_long_prompt(scored_run, capsys):
    """Before: a prompt longer than the trained seq_len was fed up to max_position_embeddings (2048) tokens.
    After: the mixture sees the last seq_len tokens, and generate says so."""
    from q0ds.ensemble import MixtureLM
    run, cfg = scored_run
    assert q0ds(capsys, "fit-prior", "--run", run)[0] == 0
    lm = MixtureLM.from_run(run, k=1)
    assert lm.seq_len == cfg.train.seq_len < lm.models[0].config.max_position_embeddings
    seen = []
    lm.models[0].register_forward_pre_hook(lambda m, args, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    prompt = " ".join(["the import statement binds names"] * 40)
    assert len(lm.tokenizer(prompt).input_ids) > 2 * cfg.train.seq_len
    lm.generate(prompt, max_new_tokens=3, temperature=0)
    # the last seq_len tokens; the first new token overflows the window, so the cache is rebuilt from the last
    # seq_len // 2 tokens (q0ds/ensemble.py, the trained context); then one token a step (KV cache)
    assert seen == [cfg.train.seq_len, cfg.train.seq_len // 2, 1]
    code, _, err = q0ds(capsys, "generate", "--run", run, "--k", "1", "--prompt", prompt, "--max-new-tokens", "2")
    assert code == 0 and f"more than the trained seq_len {cfg.train.seq_len}" in err, err


def test_embedded_corpus_is_the_shipped_pinned_copy():
    """Before: the corpus came from the running interpreter's pydoc_data (README losses reproduced only on
    CPython 3.11.7). After: a shipped, sha256-checked copy with its PSF license."""
    import hashlib
    import lzma
    from q0ds import corpus
    raw = lzma.decompress(corpus.TOPICS_FILE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == corpus.TOPICS_SHA256
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (corpus.TOPICS_FILE.parent / "LICENSE-PSF.txt").read_text()
    assert len(corpus.embedded_documents()) == 117
    assert corpus.TOPICS_VERSION in corpus.embedded_source()


def test_cli_lists_only_existing_presets():
    """Before: `init-config --help` offered a `demo` preset that did not exist."""
    from q0ds.cli import build_parser
    from q0ds.presets import PRESETS
    sub = next(a for a in build_parser()._subparsers._group_actions if a.dest == "cmd")
    help_text = sub.choices["init-config"].format_help()
    listed = help_text.split("q0ds/presets.py:")[1].split("\n")[0]
    assert [s.strip() for s in listed.split("|")] == list(PRESETS)


def test_ensemble_distill_uses_public_helpers_only():
    """Before: ensemble_distill imported cli._user_errors (a cycle with cli.py) and private helpers of
    population.py and report.py."""
    import ast
    tree = ast.parse((ROOT / "q0ds/ensemble_distill.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("cli", "population", "report", "q0ds.cli"):
            assert node.module != "cli" and node.module != "q0ds.cli"
            assert not [a.name for a in node.names if a.name.startswith("_")], ast.dump(node)


def test_prepare_warns_on_a_small_fitness_set(capsys, tmp_path):
    """Issue 20: fitted on 750 fitness tokens the learned prior lost to the uniform mixture on held-out fitness
    tokens; `prepare` warns below the measured floor and says nothing at the default."""
    from q0ds.cli import FITNESS_TOKENS_MIN
    common = ["prepare", "--embedded", "--vocab-size", 512, "--max-train-tokens", 20000]
    code, _, err = q0ds(capsys, *common, "--fitness-tokens", FITNESS_TOKENS_MIN - 750, "--out", tmp_path / "a")
    assert code == 0 and f"warning: --fitness-tokens {FITNESS_TOKENS_MIN - 750} is below {FITNESS_TOKENS_MIN}" in err, err
    code, _, err = q0ds(capsys, *common, "--out", tmp_path / "b")
    assert code == 0 and "warning" not in err, err


# ---------------------------------------------------------------- issue 22, faults
def _one_error_line(code, err, cmd):
    lines = [l for l in err.splitlines() if l.startswith(f"q0ds {cmd}: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err[-3000:])
    return lines[0]


def test_broken_snapshot_tokenizer_is_named_with_the_fix(scored_run, embedded_data, tmp_path, capsys):
    """Before: generate/eval/fit-prior on a snapshot whose tokenizer.json does not parse ended in a
    JSONDecodeError traceback. After: one line naming the file and the cp command that restores it; after
    running that fix the commands work."""
    from q0ds.snapshot import SnapshotError, load_tokenizer
    run = tmp_path / "run"
    shutil.copytree(scored_run[0], run)
    snap = run / "bases/base-00/snapshots/cycle-0001"
    assert q0ds(capsys, "fit-prior", "--run", run)[0] == 0               # prior.json for generate/eval
    tok = snap / "tokenizer.json"
    tok.write_text(tok.read_text()[:300])
    for cmd in (["fit-prior", "--run", run], ["eval", "--run", run],
                ["generate", "--run", run, "--k", "2", "--prompt", "x"]):
        line = _one_error_line(*q0ds(capsys, *cmd)[::2], cmd[0])
        assert str(tok) in line and f"cp {embedded_data / 'tokenizer'}/* {snap}/" in line, line
    with pytest.raises(SnapshotError, match="tokenizer.json"):
        load_tokenizer(snap)
    shutil.copy(embedded_data / "tokenizer" / "tokenizer.json", tok)       # the fix the message gives
    assert q0ds(capsys, "fit-prior", "--run", run)[0] == 0
    assert load_tokenizer(snap).vocab_size > 0


def test_prepared_data_with_broken_tokenizer_says_rerun_prepare(make_config, embedded_data, tmp_path):
    """Before: `could not load the tokenizer in ...: <JSON error>` without a next step. After: the file and
    `q0ds prepare --out DATA` to rewrite it."""
    data = tmp_path / "data"
    shutil.copytree(embedded_data, data)
    (data / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "truncation": nu')
    from q0ds.data import DataError, PreparedData
    with pytest.raises(DataError) as e:
        PreparedData.open(data).load_tokenizer()
    assert str(data / "tokenizer" / "tokenizer.json") in str(e.value) and f"q0ds prepare --out {data}" in str(e.value)


def test_copied_snapshot_dir_is_not_a_member(scored_run, tmp_path, capsys):
    """Before: `cycle-0001.bak` (a user's copy) was fitted as a third member. After: it is ignored with one
    warning line, and a copy under a canonical name (same sha256) is refused."""
    run = tmp_path / "run"
    shutil.copytree(scored_run[0], run)
    snaps = run / "bases/base-00/snapshots"
    shutil.copytree(snaps / "cycle-0001", snaps / "cycle-0001.bak")
    shutil.copytree(snaps / "cycle-0001", run / "bases/base-00-old/snapshots/cycle-0001")
    code, out, err = q0ds(capsys, "fit-prior", "--run", run)
    assert code == 0, err
    assert json.loads((run / "prior.json").read_text())["members"] == ["base-00/cycle-0000", "base-00/cycle-0001"]
    warn = [l for l in err.splitlines() if "warning: ignoring" in l]
    assert len(warn) == 1 and "cycle-0001.bak" in warn[0] and "base-00-old" in warn[0], err
    assert q0ds(capsys, "eval", "--run", run)[0] == 0
    shutil.copytree(snaps / "cycle-0001", snaps / "cycle-0007")
    line = _one_error_line(*q0ds(capsys, "fit-prior", "--run", run)[::2], "fit-prior")
    assert "cycle-0007" in line and "cycle-0001" in line and "same weights" in line and "delete the copy" in line


def _kill_while_writing_prior(run: Path, sig) -> subprocess.CompletedProcess:
    """`q0ds fit-prior` in a subprocess, stopped by SIG while it writes prior.json's temp file (a sitecustomize
    hook makes the write block: the fsync of the temp file waits for the signal)."""
    hook = run.parent / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(
        "import os, time\n_fsync = os.fsync\n"
        "def slow(fd):\n"
        "    if '.prior.json.tmp' in os.readlink(f'/proc/self/fd/{fd}'):\n"
        "        open(os.environ['Q0DS_TEST_MARK'], 'w').close()\n"
        "        time.sleep(60)\n"
        "    return _fsync(fd)\n"
        "os.fsync = slow\n")
    mark = run.parent / "writing"
    env = dict(os.environ, PYTHONPATH=f"{hook}:{ROOT}", Q0DS_TEST_MARK=str(mark))
    p = subprocess.Popen([sys.executable, "-m", "q0ds.cli", "fit-prior", "--run", str(run)], cwd=ROOT, env=env,
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    import time
    t0 = time.time()
    while not mark.exists():
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()
        time.sleep(0.05)
    assert list(run.glob(".prior.json.tmp-*"))                       # the temp file is there, mid-write
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    mark.unlink()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_signal_while_writing_prior_leaves_no_temp_file(scored_run, tmp_path):
    """Before: fit-prior killed (SIGTERM) while writing left `.prior-XXXX.tmp`. After: SIGTERM removes it
    (exit 143, prior.json untouched), and a temp file left by SIGKILL is removed by the next write."""
    import signal
    run = tmp_path / "run"
    shutil.copytree(scored_run[0], run)
    p = _kill_while_writing_prior(run, signal.SIGTERM)      # SIGINT takes the same path (KeyboardInterrupt)
    assert p.returncode == 143 and "stopped by SIGTERM" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not list(run.glob(".prior*")), sorted(run.iterdir())
    p = _kill_while_writing_prior(run, signal.SIGKILL)
    assert p.returncode == -9 and len(list(run.glob(".prior.json.tmp-*"))) == 1
    from q0ds.population import fit_prior_run
    fit_prior_run(run, steps=5)
    assert not list(run.glob(".prior*")) and (run / "prior.json").is_file()


@pytest.mark.parametrize("rows, needle", [
    ([{"text": None}, {"text": "  \n "}], "all null or blank in field 'text'"),
    ([{"text": 1}, {"text": 2}], "holds int, not text"),
])
def test_parquet_without_usable_text_says_what_to_do(tmp_path, capsys, rows, needle):
    """Before: 'empty corpus: ... has no non-empty documents' / "field 'text' holds int, not text" with no
    next step. After: what is wrong, the file, and --text-field as the fix."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, other="x") for r in rows]), f)
    line = _one_error_line(*q0ds(capsys, "prepare", "--input", f, "--out", tmp_path / "d")[::2], "prepare")
    assert needle in line and str(f) in line and "--text-field" in line, line


def test_prepare_with_a_tokenizer_that_does_not_parse(embedded_data, tmp_path, capsys):
    tok = tmp_path / "tok"
    shutil.copytree(embedded_data / "tokenizer", tok)
    (tok / "tokenizer.json").write_text("{")
    docs = tmp_path / "a.txt"
    docs.write_text("hello world\n\nagain")
    line = _one_error_line(*q0ds(capsys, "prepare", "--input", docs, "--out", tmp_path / "d", "--tokenizer", tok)[::2],
                           "prepare")
    assert str(tok) in line and "save_pretrained" in line and "omit --tokenizer" in line, line

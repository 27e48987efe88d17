"""benchmarks/de_fit3k.py: the headline with every decision on 3,000 fitness tokens, on val and test, regenerates
from its committed cache alone (no work dir), and the cache agrees with the data-efficiency ledger where both
compute the same number. Reads committed files only (~5 s, no training)."""
import json
import shutil

import pytest

from benchmarks import de_fit3k as F, de_honest as H

R = F.RESULTS


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("fit3k")
    shutil.copy(R / F.CACHE.name, out / F.CACHE.name)
    empty = out / "no-work-dir"
    F.write(out, F.N_FIT, work=empty, study_work=empty, verbose=False, plot_too=False)
    return out


def test_regenerates_byte_identically_from_the_cache(regenerated):
    for name in ("data_efficiency_fit3k.json", "data_efficiency_fit3k.md", F.CACHE.name):
        assert (regenerated / name).read_bytes() == (R / name).read_bytes(), f"{name} differs from the committed copy"


def test_cache_matches_the_ledger_on_all_fitness_tokens():
    """The grid points' losses at their best epoch on ALL fitness tokens, computed here from the score files,
    equal de_eval.single_curve's in the ledger; and the n-token subset is read in the score files' token order
    (the temperature fit's logits give the same loss to 1e-5 nats)."""
    cache = json.loads((R / F.CACHE.name).read_text())
    grids = H.budget_grids(H.Ledger(R / "data_efficiency_ledger.json"))
    checked = 0
    for E, g in grids.items():
        for p in g["points"]:
            name = f"tuneE{E}-lr{p['lr']:g}-wd{p['wd']:g}"
            c = cache["runs"][name]["eval"]["on_all"]
            assert c["fitness_all"] == pytest.approx(p["fitness_loss"], abs=1e-9)
            assert c["val"] == pytest.approx(p["val_loss"], abs=1e-9) and c["test"] == pytest.approx(p["test_loss"], abs=1e-9)
            checked += 1
    assert checked >= 81
    res = json.loads((R / "data_efficiency_fit3k.json").read_text())
    assert res["score_order_check_max_nats"] < 1e-5


def test_every_decision_reads_n_tokens_and_every_budget_is_reported():
    res = json.loads((R / "data_efficiency_fit3k.json").read_text())
    assert res["fitness_tokens_read"] == F.N_FIT and res["share_of_train"] < 0.07
    for sp in F.SPLITS:
        for E in map(str, H.BUDGETS):
            assert res["three_way"][sp][E]["flop"]["ratio"] is not None
            p = res["by_budget"][E][sp]["population"]
            assert p["total_gain"]["mean"] == pytest.approx(p["recipe_gain"]["mean"] + p["population_gain"]["mean"])


def test_readme_headline_is_the_committed_test_table():
    """The README's ratio table is data_efficiency_fit3k.json's test ratios (per FLOP, per wall second, per
    epoch), to the printed digit."""
    import re
    res = json.loads((R / "data_efficiency_fit3k.json").read_text())["three_way"]["test"]
    readme = (F.ROOT / "README.md").read_text()
    for E in map(str, H.BUDGETS):
        row = next(line for line in readme.splitlines() if line.startswith(f"| {E} | ") and "x [" in line)
        cells = re.findall(r"(\d+\.\d\d)x \[(\d+\.\d\d), (\d+\.\d\d)\]", row)
        want = [res[E][ax]["ratio"] for ax in ("flop", "wall", "epoch")]
        assert cells == [(f"{w['mean']:.2f}", f"{w['lo']:.2f}", f"{w['hi']:.2f}") for w in want], (E, row)


def test_more_seeds_cells_pool_the_extra_seeds_with_the_first_three(tmp_path, monkeypatch):
    """n = 5 cells: seeds 3 and 4 (benchmarks/de_more_seeds.py) made here as copies of seeds 0 and 1, so each
    cell's per-seed values must be the n = 3 values followed by the first two again."""
    cache = json.loads((R / F.CACHE.name).read_text())
    ledger = {"format": 1, "runs": {}}
    for new, old in ((3, 0), (4, 1)):
        for name_new, name_old in ((f"q0-s{new}", f"pop-s{old}"), (f"sfit-E32-s{new}", f"sfit-E32-s{old}"),
                                   (f"sfit-E64-s{new}", f"sfit-E64-s{old}"), (f"pmem-L16-s{new}", f"pmem-L16-s{old}"),
                                   (f"pfit-E64-M2-s{new}", f"pfit-E64-M2-s{old}")):
            cache["runs"][name_new] = dict(cache["runs"][name_old], fingerprint=f"fp-{name_new}")
            ledger["runs"][name_new] = {"fingerprint": f"fp-{name_new}", "complete": True}
    (tmp_path / "seeds.json").write_text(json.dumps(ledger))
    monkeypatch.setattr(F, "SEEDS_LEDGER", tmp_path / "seeds.json")
    res = F.compute(F.N_FIT, cache)
    assert set(res["more_seeds"]) == {"32", "64"}
    for E, by in res["more_seeds"].items():
        for sp, rows in by.items():
            assert set(rows) == {"K=1", "K=2", "total", "recipe", "population"}
            for cell, x in rows.items():
                p3 = x["n3"]["per_seed"]
                assert x["n5"]["per_seed"] == pytest.approx(p3 + p3[:2]), (E, sp, cell)

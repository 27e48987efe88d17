"""The refusal that stays for a changed world size: a checkpoint DeepSpeed's converter cannot read. The message
says how to convert by hand (the 2 -> 1 and 1 -> 2 resumes themselves are in test_e2e_deepspeed.py)."""
import pytest


def test_unconvertible_checkpoint_says_how_to_convert(tmp_path):
    from q0ds import engine as E
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError) as e:
        E.to_universal(tmp_path, "step-00000004", source_world=2)
    msg = str(e.value)
    assert "python -m q0ds.engine_universal --input_folder" in msg and "relaunch with 2 ranks" in msg
    assert not (tmp_path / "universal" / "step-00000004" / E.UNIVERSAL_DONE).exists()


def test_universal_ds_config_sets_load_universal():
    from q0ds import engine as E
    base = {"zero_optimization": {"stage": 3}}
    assert E.universal_ds_config(base)["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in base

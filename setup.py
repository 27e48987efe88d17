"""q0ds package metadata: compatible ranges, so `pip install q0ds` goes beside a cluster's own CUDA torch.

The exact versions CI tests are in constraints.txt (`make venv` installs with `-c constraints.txt`); the
ranges below are what q0ds supports. docs/install.md says which versions are tested where.
"""
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent

install_requires = [
    # Never pinned exactly: an exact torch would replace the node's CUDA build. 2.11 is the oldest read against.
    "torch>=2.11,<3",
    # Pinned to the 0.19 series (and >= the tested 0.19.8): q0ds wraps ZeRO-3 internals that DeepSpeed does not
    # keep stable across minor releases (docs/install.md lists them, with the q0ds lines that use them):
    # DeepSpeedZeroOptimizer_Stage3._apply_muon_to_accumulated_grads / .averaged_gradients / .loss_scale
    # (engine.install_raw_grad_clip), DeepSpeedEngine._zero3_consolidated_16bit_state_dict, the Muon param-group
    # names of DeepSpeedEngine._muon_param_groups, deepspeed.checkpoint.ds_to_universal.main's argument set,
    # the CPU shm all-reduce buffer name (ops/csrc/cpu/comm/shm.cpp), ds_numel on partitioned parameters and
    # runtime.zero.stage3.estimate_zero3_model_states_mem_needs.
    "deepspeed>=0.19.8,<0.20",
    # 5.17 is the floor (tested by tests/test_transformers_floor.py); q0ds/compat.py covers its API gaps.
    "transformers>=5.17,<6",
    "tokenizers>=0.23.1,<0.24",      # the range transformers 5.17-5.23 accept; data.py trains BPE with it
    "safetensors>=0.8,<1",
    "hjson>=3.1,<4",
    "numpy>=1.26,<3",
    "tqdm>=4.60",
    "matplotlib>=3.8",               # report and plan plots
]

extras_require = {
    "monitor": ["tensorboard>=2.15", "wandb>=0.30"],
    # lm_eval_adapter subclasses lm-eval's TemplateLM and uses lm_eval.models.utils helpers: same minor series.
    # accelerate: lm_eval.models.huggingface imports it at module level (lm_eval does not declare it)
    "eval": ["lm_eval>=0.4.13,<0.5", "accelerate>=1.0"],
    # Reading text/JSONL/Parquet input with `q0ds prepare --input` (data.py); --embedded needs nothing extra.
    "data": ["datasets>=4.0"],
}
extras_require["all"] = sorted({r for v in extras_require.values() for r in v})



class BuildPyShipped(build_py):
    """Also copy the launcher and the DeepSpeed configs (outside the package in the checkout) into the wheel as
    q0ds/_shipped/ (q0ds.compat.repo_file finds them there when q0ds is installed from a wheel)."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "q0ds" / "_shipped"
        (dest / "launchers").mkdir(parents=True, exist_ok=True)
        shutil.copy2(HERE / "launchers" / "train.py", dest / "launchers" / "train.py")
        shutil.copytree(HERE / "ds_configs", dest / "ds_configs", dirs_exist_ok=True)


setup(
    name="q0ds",
    version="0.1.0",
    description="q0 hyper-epoch pretraining (cyclic schedule, chain distillation, learned prior) on DeepSpeed",
    packages=find_packages(include=["q0ds", "q0ds.*"]),
    package_data={"q0ds": ["tasks/*", "corpus_data/*"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["q0ds=q0ds.cli:main"]},
    cmdclass={"build_py": BuildPyShipped},
)

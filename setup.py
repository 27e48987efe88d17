from pathlib import Path

from setuptools import find_packages, setup

reqs = [l.split("#")[0].strip() for l in Path(__file__).with_name("requirements.txt").read_text().splitlines()]
setup(
    name="q0ds",
    version="0.1.0",
    description="q0 hyper-epoch pretraining (cyclic schedule, chain distillation, learned prior) on DeepSpeed",
    packages=find_packages(include=["q0ds", "q0ds.*"]),
    package_data={"q0ds": ["tasks/*", "corpus_data/*"]},
    python_requires=">=3.10",
    install_requires=[r for r in reqs if r and not r.startswith("pytest")],
    entry_points={"console_scripts": ["q0ds=q0ds.cli:main"]},
)

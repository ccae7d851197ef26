"""rankline: raw impression logs -> Beam/tensorflow-transform -> multi-task ranking models -> TF Serving."""
from setuptools import find_packages, setup


def _requirements():
    with open("requirements.txt", encoding="utf-8") as fh:
        return [line.strip() for line in fh if line.strip() and not line.startswith("#")]


setup(
    name="rankline",
    version="0.1.0",
    description="Production ranking pipeline: preprocessing, multi-task models, TF Serving export.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["pipeline", "pipeline.*", "models", "models.*",
                                    "transforms", "transforms.*", "serving", "serving.*"]),
    package_data={"transforms": ["schemas/*.yaml"]},
    install_requires=_requirements(),
    # `rankline run|retrain|score|benchmark|infer-schema ...` = `python -m <module> ...` (pipeline/cli.py)
    entry_points={"console_scripts": ["rankline = pipeline.cli:main"]},
)

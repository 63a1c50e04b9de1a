"""Promote a registered model version to `champion`: the human step between evaluation and use.

Every evaluation registers a version and points `candidate` at it (cxr/serving.py); whoever
reviews its card (the version's description: test figures with patient intervals) moves
`champion`, which is what deployments serve (`models:/<name>@champion`).

    python tools/promote.py                 # the current candidate becomes champion
    python tools/promote.py --version 3     # or a version by number

Uses $MLFLOW_TRACKING_URI, else the project's store, as the stages do.
"""

from __future__ import annotations

import argparse

import mlflow

from cxr.params import load_params
from cxr.serving import CANDIDATE
from cxr.tracking import tracking_uri

CHAMPION = "champion"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help=f"version number (default: the @{CANDIDATE})")
    args = parser.parse_args()
    settings = load_params().mlflow
    client = mlflow.MlflowClient(tracking_uri(settings.tracking_uri))
    name = settings.registered_model
    if args.version:
        version = client.get_model_version(name, args.version)
    else:
        version = client.get_model_version_by_alias(name, CANDIDATE)
    client.set_registered_model_alias(name, CHAMPION, version.version)
    print(f"models:/{name}@{CHAMPION} -> version {version.version}\n{version.description}")


if __name__ == "__main__":
    main()

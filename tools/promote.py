"""Promote a registered model version to `champion`: the human step between evaluation and use.

Every evaluation registers a version and points `candidate` at it (cxr/serving.py); whoever
reviews its card (the version's description: test figures with patient intervals) moves
`champion`, which is what deployments serve (`models:/<name>@champion`).

    python tools/promote.py                 # the one version registered since the champion
    python tools/promote.py --version 3     # or a version by number

Without --version it promotes only when the choice is unambiguous. `dvc queue start` runs
several experiments, each registering a version, and `candidate` points at whichever finished
last, not the best one: with more than one version since the champion (or, with no champion,
more than one version at all), it lists them and asks for --version.

Uses $MLFLOW_TRACKING_URI, else the project's store, as the stages do.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
from mlflow.entities.model_registry import ModelVersion

from cxr.params import StageParams, load_params
from cxr.tracking import tracking_uri

CHAMPION = "champion"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", help="version number (default: the one registered since the champion)"
    )
    args = parser.parse_args(argv)
    settings = load_params(StageParams).mlflow
    client = mlflow.MlflowClient(tracking_uri(settings.tracking_uri))
    name = settings.registered_model
    if args.version:
        version = client.get_model_version(name, args.version)
    else:
        aliases = client.get_registered_model(name).aliases  # {alias: version number}
        champion = str(aliases[CHAMPION]) if CHAMPION in aliases else None
        unpromoted = registered_since(client, name, champion)
        if not unpromoted:
            print(f"models:/{name}@{CHAMPION} is version {champion}, the latest: nothing to do")
            return
        if len(unpromoted) > 1:
            sys.exit(ask_for_version(name, champion, unpromoted))
        (version,) = unpromoted
    client.set_registered_model_alias(name, CHAMPION, version.version)
    print(f"models:/{name}@{CHAMPION} -> version {version.version}\n{version.description}")


def registered_since(
    client: mlflow.MlflowClient, name: str, champion: str | None
) -> list[ModelVersion]:
    """The versions registered after the champion (every version if there is none), oldest
    first: those a reviewer has not chosen between yet."""
    versions = client.search_model_versions(f"name = '{name}'")
    after = int(champion) if champion else 0
    return sorted((v for v in versions if int(v.version) > after), key=lambda v: int(v.version))


def ask_for_version(name: str, champion: str | None, versions: list[ModelVersion]) -> str:
    """The message that lists the versions to choose between, each with its experiment name
    and the first lines of its card (model, then test figures), and asks for --version."""
    where = f"since the champion (version {champion})" if champion else "and no champion yet"
    lines = [f"{len(versions)} versions of {name} registered {where}; choose one:"]
    for version in versions:
        experiment = version.tags.get("dvc.exp_name", "no DVC experiment name")
        lines.append(f"  version {version.version} ({experiment}):")
        card = (version.description or "no description").splitlines()[:2]
        lines += [f"      {line}" for line in card]
    lines.append("and promote it: python tools/promote.py --version N")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

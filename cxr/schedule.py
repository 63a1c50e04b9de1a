"""What trains when, and at what rate: transfer learning's frozen head phase and unfreezing,
AdamW's parameter groups, and the learning rate per step (timm's warm-up and cosine).
"""

from __future__ import annotations

import torch
from timm.models import group_parameters
from timm.scheduler import CosineLRScheduler
from torch import nn


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> list[dict]:
    """AdamW's parameter groups: the head's first (its learning rate is the one logged), then
    the backbone's at `lr * backbone_lr_scale`; each split by timm's convention of no weight
    decay on norm weights and biases (1-d parameters) and the model's `no_weight_decay()`.

    Fine-tuning pretrained features often wants a lower backbone rate than a new head's; the
    default scale 1.0 trains every weight at `lr` as before.
    """
    head = set(layer_groups(model)[-1])
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        decay = not (parameter.ndim <= 1 or name.endswith(".bias") or name in skip)
        groups.setdefault((name in head, decay), []).append(parameter)
    return [
        {"params": groups[is_head, decay], "head": is_head,
         "lr": lr if is_head else lr * backbone_lr_scale,
         "weight_decay": weight_decay if decay else 0.0}
        for is_head in (True, False) for decay in (False, True) if (is_head, decay) in groups
    ]  # fmt: skip


class Schedule:
    """The learning rate per optimizer step: a constant `head_lr` for the head alone while the
    backbone is frozen, then timm's linear warm-up to each group's rate and cosine decay to
    `min_lr` over the remaining steps.

    A network trained from scratch at a high learning rate can stall in its first updates
    (BatchNorm statistics still settling); a short warm-up lets it start gently. A new head on
    frozen pretrained features needs no warm-up, and must not get the decay either: when warm-up
    and cosine spanned the frozen epochs too, a one-epoch frozen phase ended at about lr/150
    and its head had not learned (validation AUC 0.36 on real X-rays, efficientnet-lite0). So
    the schedule proper starts when the backbone thaws. Frozen groups have no gradients, so
    their rate is moot until then.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float,
        frozen_steps: int = 0,
        head_lr: float | None = None,
    ) -> None:
        self.optimizer, self.frozen_steps, self.head_lr = optimizer, frozen_steps, head_lr
        self.warmup_steps = warmup_steps
        self.cosine = CosineLRScheduler(
            optimizer,
            t_initial=max(1, total_steps - frozen_steps - warmup_steps),
            lr_min=min_lr,
            warmup_t=warmup_steps,
            warmup_lr_init=0.0,
            warmup_prefix=True,  # the cosine's steps start after the warm-up's
            t_in_epochs=False,  # updated per optimizer step, not per epoch
        )
        self.steps = 0
        self._set_rates()

    def step(self) -> None:
        """After each optimizer step: set the rates for the next one."""
        self.steps += 1
        self._set_rates()

    def _set_rates(self) -> None:
        # Steps since the thaw. timm's warm-up gives its update 0 a rate of 0, so warm-up steps
        # count from 1: the first trains at rate / warmup_steps, the last at the full rate, and
        # the cosine starts from its peak. Frozen groups wait at the rate they thaw into.
        step = max(0, self.steps - self.frozen_steps)
        self.cosine.step_update(step + 1 if step < self.warmup_steps else step)
        if self.steps < self.frozen_steps:
            for group in self.optimizer.param_groups:
                if group.get("head", True):
                    group["lr"] = self.head_lr or group["initial_lr"]

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = state["steps"]
        self._set_rates()


def layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names from the stem to the head, in timm's coarse groups (stem, blocks, head)."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[key] for key in sorted(groups)]


def first_trainable_group(epoch: int, freeze_epochs: int, unfreeze: str, groups: int) -> int:
    """Transfer learning's schedule: the head alone for `freeze_epochs`, then either the whole
    network at once (`all`) or one more group per epoch from the top down (`progressive`)."""
    head = groups - 1
    if epoch <= freeze_epochs:
        return head
    if unfreeze == "all":
        return 0
    return max(0, head - (epoch - freeze_epochs))


def set_trainable(model: nn.Module, groups: list[list[str]], first: int) -> None:
    """Train groups `first`.. only; frozen groups keep their BatchNorm statistics too."""
    trainable = {name for group in groups[first:] for name in group}
    for name, param in model.named_parameters():
        param.requires_grad = name in trainable
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()

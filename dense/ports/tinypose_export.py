"""PP-TinyPose with its channel shuffles folded into the weights: the form our ONNX export traces.

Why: every shuffle block of :class:`~dense.ports.tinypose.TinyPose` ends in ShuffleNet's
interleave (``concat_shuffle``: channels a0, b0, a1, b1, ...). OpenVINO runs its convolutions
in blocked or channels-last layouts, and the interleave (a reshape and transpose through five
dimensions) made it convert layouts around each of the 49 interleaves: reorders took a third of
the network's time, and the 256×192 graph ran in 15.4-16.0 ms against ncnn's 13.5 on the
2-core EPYC of docs/benchmarks.md. This form of it, with no interleave left, runs in 11.0-11.4
ms there.

How: a tensor's channels need not be stored in the network's order. Each tensor here has an
``order``: ``order[j]`` is the channel of the original network stored at position ``j``. A
convolution reads any order (its input weights are permuted to match) and writes any order
(its output rows permuted); a depthwise one keeps its input's. A shuffle block takes its
second half from the second half of the stored tensor (kept so by construction), and its output
is one concatenation of slices of its input and of the new half, arranged so that the next
block's halves are contiguous again: 4 to 14 slices a block for the 40-320 channel branches,
all in one copy, as much as the concatenation a block needs anyway. Nothing is approximated:
only the order in which each convolution sums its inputs changes (outputs equal to 1e-5,
tests/test_ports_tinypose.py). Nearest upsampling is written as ``F.interpolate`` here, which
OpenVINO fuses with the add; PyTorch's eager path keeps ``add_upsampled``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dense.ports.tinypose import (
    Conv,
    DepthwiseSeparable,
    Fuse,
    HRModule,
    IterativeHead,
    ShuffleBlock,
    Stem,
    TinyPose,
    Upsample,
)

Order = np.ndarray | None  # order[j]: the original channel stored at j; None: the original order


def reordered_conv(conv: Conv, src: Order = None, dst: Order = None) -> Conv:
    """A copy of ``conv`` that reads channels stored in order ``src`` and writes them in order
    ``dst``. A depthwise conv writes in the order it reads (``dst`` must be None)."""
    weight, bias = conv.weight.detach(), conv.bias.detach()
    depthwise = conv.groups > 1
    if depthwise and (not conv.groups == conv.in_channels == conv.out_channels
                      or dst is not None):
        raise ValueError("only depthwise convs (groups = channels) keep their input's order")
    if src is not None:
        index = torch.as_tensor(src)
        weight = weight[index] if depthwise else weight[:, index]
        bias = bias[index] if depthwise else bias
    if dst is not None:
        index = torch.as_tensor(dst)
        weight, bias = weight[index], bias[index]
    copy = Conv(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
                conv.groups, conv.relu)
    with torch.no_grad():
        copy.weight.copy_(weight)
        copy.bias.copy_(bias)
    return copy.eval()


def reordered_separable(block: DepthwiseSeparable, src: Order = None,
                        dst: Order = None) -> DepthwiseSeparable:
    """A copy of a depthwise separable block reading order ``src`` and writing ``dst``."""
    copy = DepthwiseSeparable.__new__(DepthwiseSeparable)
    nn.Module.__init__(copy)
    copy.dw = reordered_conv(block.dw, src)
    copy.pw = reordered_conv(block.pw, src, dst)
    return copy


def reordered_chain(blocks: nn.Sequential, src: Order, dst: Order) -> nn.Sequential:
    """A chain of depthwise separable blocks reading ``src`` and writing ``dst`` at its end."""
    last = len(blocks) - 1
    return nn.Sequential(*(reordered_separable(b, src if k == 0 else None,
                                               dst if k == last else None)
                           for k, b in enumerate(blocks)))


def concat_slices(sources: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``(tensor, start, stop)`` slices that give ``sources`` (a ``(tensor, channel)`` per
    output channel) in one concatenation: consecutive channels of one tensor share a slice."""
    slices: list[list[int]] = []
    for tensor, channel in sources:
        if slices and slices[-1][0] == tensor and slices[-1][2] == channel:
            slices[-1][2] += 1
        else:
            slices.append([tensor, channel, channel + 1])
    return [(t, start, stop) for t, start, stop in slices]


def explicit_order(order: Order, channels: int) -> np.ndarray:
    """``order`` as an array (the original order for None)."""
    return np.arange(channels) if order is None else np.asarray(order)


class UnshuffledBlock(nn.Module):
    """A :class:`ShuffleBlock` reading its input in a stored order whose second half holds the
    original second half; its output's order (``self.order``) has the same property."""

    def __init__(self, block: ShuffleBlock, order: Order) -> None:
        super().__init__()
        half = block.pw1.in_channels
        order = explicit_order(order, 2 * half)
        if set(order[half:].tolist()) != set(range(half, 2 * half)):
            raise ValueError("the stored order must keep the second half in the second half")
        self.half = half
        self.pw1 = reordered_conv(block.pw1, order[half:] - half)
        self.dw, self.pw2 = reordered_conv(block.dw), reordered_conv(block.pw2)
        # Output channel c of the original block is input channel c/2 (even c, from the kept
        # half, stored at position[c/2]) or new channel (c-1)/2 (odd c, from tensor 1).
        position = np.argsort(order)
        sources = [(0, int(position[c // 2])) if c % 2 == 0 else (1, (c - 1) // 2)
                   for c in range(2 * half)]
        # Stored: the first half's channels first, each half by source tensor and position,
        # so that consecutive channels of one tensor make one slice.
        self.order = np.array(sorted(range(2 * half),
                                     key=lambda c: (c >= half, *sources[c])))
        self.slices = concat_slices([sources[c] for c in self.order])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.pw2(self.dw(self.pw1(x[:, self.half:])))
        return torch.cat([(x, new)[t][:, start:stop] for t, start, stop in self.slices], 1)


class UnshuffledStem(nn.Module):
    """The :class:`Stem`, its final interleave left out: stored order even channels, then odd."""

    def __init__(self, stem: Stem) -> None:
        super().__init__()
        self.conv = reordered_conv(stem.conv)
        self.branch1 = reordered_separable(stem.branch1)
        self.expand = reordered_conv(stem.expand)
        self.branch2 = reordered_separable(stem.branch2)
        channels = 2 * stem.branch1.pw.out_channels
        self.order = np.concatenate([np.arange(0, channels, 2), np.arange(1, channels, 2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        return torch.cat([self.branch1(a), self.branch2(self.expand(b))], 1)


class NearestUpsample(Upsample):
    """:class:`Upsample` with ``F.interpolate``'s nearest upsampling, which OpenVINO fuses with
    the add that follows (PyTorch's eager path keeps ``add_upsampled``, faster there)."""

    def __init__(self, conv: Conv, factor: int) -> None:
        nn.Module.__init__(self)  # the conv is given, not built
        self.conv, self.factor = conv, factor

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + F.interpolate(self.conv(x), scale_factor=self.factor, mode="nearest")


class UnshuffledFuse(nn.Module):
    """A :class:`Fuse` in stored orders: row ``i``'s term from branch ``j`` reads branch
    ``j``'s order and writes branch ``i``'s, so that the row's sum (and the output) is in
    branch ``i``'s order, as is its own term, branch ``i``'s tensor itself."""

    def __init__(self, fuse: Fuse, orders: list[Order]) -> None:
        super().__init__()
        self.rows = nn.ModuleList()
        for i, row in enumerate(fuse.rows):
            terms = nn.ModuleList()
            for j, layer in enumerate(row):
                if i == j:
                    terms.append(nn.Identity())
                elif isinstance(layer, Upsample):
                    terms.append(NearestUpsample(
                        reordered_conv(layer.conv, orders[j], orders[i]), layer.factor))
                else:
                    terms.append(reordered_chain(layer, orders[j], orders[i]))
            self.rows.append(terms)

    # The same sums, with its two quirks (see dense.ports.tinypose): the rows' terms differ.
    forward = Fuse.forward


class UnshuffledModule(nn.Module):
    """An :class:`HRModule`: each branch's blocks, then the fuse, in stored orders."""

    def __init__(self, module: HRModule, orders: list[Order]) -> None:
        super().__init__()
        orders = list(orders)
        self.branches = nn.ModuleList()
        for k, branch in enumerate(module.branches):
            blocks = []
            for block in branch:
                blocks.append(UnshuffledBlock(block, orders[k]))
                orders[k] = blocks[-1].order
            self.branches.append(nn.Sequential(*blocks))
        self.orders = list(orders)  # the fuse keeps each branch's order
        self.fuse = UnshuffledFuse(module.fuse, self.orders)

    forward = HRModule.forward


class UnshuffledTinyPose(nn.Module):
    """:class:`TinyPose` with no channel shuffle: the same function of its input (see the
    module doc), N×3×H×W RGB in [0, 1] → N×17×H/4×W/4 heatmaps in the original order."""

    def __init__(self, model: TinyPose) -> None:
        super().__init__()
        self.register_buffer("mean", model.mean.clone(), persistent=False)
        self.register_buffer("inv_std", model.inv_std.clone(), persistent=False)
        self.stem = UnshuffledStem(model.stem)
        first, second = model.transitions[0]
        self.transitions = nn.ModuleList([nn.ModuleList([
            reordered_separable(first, self.stem.order),
            reordered_separable(second, self.stem.order)])])
        orders: list[Order] = [None, None]
        self.stages = nn.ModuleList()
        for s, stage in enumerate(model.stages):
            if s > 0:
                self.transitions.append(nn.ModuleList([
                    reordered_separable(model.transitions[s][0], orders[-1])]))
                orders.append(None)
            modules = []
            for module in stage:
                modules.append(UnshuffledModule(module, orders))
                orders = modules[-1].orders
            self.stages.append(nn.Sequential(*modules))
        self.head = self._head(model.head, orders)
        self.final = reordered_conv(model.final)
        self.config = getattr(model, "config", {})

    @staticmethod
    def _head(head: IterativeHead, orders: list[Order]) -> IterativeHead:
        """The head's projects, coarsest first: each reads its branch's order and writes the
        next finer branch's (its sum is added there); the last writes the original order."""
        rev = orders[::-1]
        copy = IterativeHead.__new__(IterativeHead)
        nn.Module.__init__(copy)
        copy.projects = nn.ModuleList(
            reordered_separable(p, rev[k], rev[k + 1] if k + 1 < len(rev) else None)
            for k, p in enumerate(head.projects))
        return copy

    forward = TinyPose.forward  # the same network walk: only the parts differ

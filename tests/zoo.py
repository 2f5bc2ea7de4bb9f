"""Small models for the whole-model driver tests: every layer kind squant quantizes, in every
place a layer can sit (nested modules, containers, a traced ``GraphModule``), plus tied weights.

Each model is built from a fixed seed, in eval mode, with an example input; sizes are tiny so
that the tests stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


def _randomize_batch_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters (not the identity of a fresh one)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and a residual (1x1 conv if reshaped)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class MiniResNet(nn.Module):
    """Stem, two residual blocks (the second downsamples), global pooling, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block1 = BasicBlock(8, 8, 1)
        self.block2 = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class MobileNetBlock(nn.Module):
    """Inverted residual: pointwise expand, depthwise 3x3 (groups == channels), pointwise
    project, each with BatchNorm, ReLU6 in between; Linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 8 * 8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Conv1dNet(nn.Module):
    """Conv1d with circular padding, a grouped dilated Conv1d, pooling, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 5, padding=2, padding_mode="circular")
        self.conv2 = nn.Conv1d(8, 12, 3, dilation=2, groups=2)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.mean(dim=2))


class Conv3dNet(nn.Module):
    """Two Conv3d (one strided with an anisotropic kernel) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv3d(4, 6, (1, 3, 3), stride=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3, 4)))


class Decoder2d(nn.Module):
    """Linear to a small feature map, then ConvTranspose2d with groups=2 and with groups=1."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(8, 4 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1, groups=2)
        self.up2 = nn.ConvTranspose2d(6, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(-1, 4, 4, 4)
        return self.up2(F.relu(self.up1(x)))


class Transpose1dNet(nn.Module):
    """ConvTranspose1d with groups=3 (different in and out channels per group)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose1d(6, 9, 3, stride=2, groups=3)
        self.mix = nn.Conv1d(9, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(F.relu(self.up(x)))


class Transpose3dNet(nn.Module):
    """ConvTranspose3d with groups=2, output_padding, and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(4, 6, 2, stride=2, output_padding=1, groups=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class TiedMLP(nn.Module):
    """``decoder`` uses the very Parameter of ``encoder`` (square 16x16); the head's weight is
    a non-contiguous (transposed) Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(16, 16)
        self.decoder = nn.Linear(16, 16)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(16, 4)
        self.head.weight = nn.Parameter(torch.randn(16, 4).t() * 0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.decoder(F.relu(self.encoder(x)))))


class Containers(nn.Module):
    """Layers in a ModuleList, a ModuleDict and nested Sequentials."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({"mean": nn.Linear(8, 4), "scale": nn.Linear(8, 4)})
        self.trunk = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
                                   nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.relu(block(x))
        x = self.trunk(x)
        return self.heads["mean"](x) + F.softplus(self.heads["scale"](x))


class SharedModule(nn.Module):
    """One Conv2d instance registered under three names: ``conv`` and ``again`` (same parent)
    and ``tail.0`` (in a Sequential); used three times."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.again = self.conv
        self.tail = nn.Sequential(self.conv)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tail(F.relu(self.again(F.relu(self.conv(x)))))
        return self.head(x.mean(dim=(2, 3)))


class TiedEmbeddingLM(nn.Module):
    """A language-model shape: the output head's weight is the embedding table (an Embedding
    and a Linear sharing one Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mixer = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.mixer(self.embed(tokens))))


class MiniGPT(nn.Module):
    """GPT-2's shape in miniature: token (``wte``) and learned position (``wpe``) embeddings, a
    pre-norm MLP block, and an ``lm_head`` tied to ``wte``."""

    def __init__(self, vocab: int = 24, dim: int = 8, context: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[-1], device=tokens.device))
        x = x + self.mlp(self.ln_1(x))
        return self.lm_head(self.ln_f(x))


class BagClassifier(nn.Module):
    """A bag-of-words classifier: an ``nn.EmbeddingBag`` (mean, with a padding token) and a
    Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode="mean", padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(tokens))


class TransformerNet(nn.Module):
    """A 2-layer ``nn.TransformerEncoder`` (causal), a ``nn.TransformerDecoderLayer`` attending
    to the encoder's output, and a Linear head: every attention weight of torch's layers."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                                  norm_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        memory = self.encoder(x, mask=mask, is_causal=True)
        return self.head(self.decoder(x, memory))


class GPTWithAttention(nn.Module):
    """A GPT block for real: token and learned position embeddings, one causal pre-norm
    ``nn.TransformerEncoderLayer`` (attention and MLP), and an ``lm_head`` tied to ``wte``."""

    def __init__(self, vocab: int = 24, dim: int = 16, context: int = 6) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, 4 * dim, dropout=0.0, batch_first=True,
                                                norm_first=True, activation="gelu")
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[-1], device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[-1])
        return self.lm_head(self.ln_f(self.block(x, src_mask=mask, is_causal=True)))


class RecurrentNet(nn.Module):
    """A 2-layer bidirectional LSTM with ``proj_size``, a GRU, a ReLU RNN and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, 2, bidirectional=True, proj_size=4, batch_first=True)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.rnn = nn.RNN(8, 6, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(x)
        x, _ = self.gru(x)
        x, _ = self.rnn(x)
        return self.head(x[:, -1])


def _traced_resnet() -> fx.GraphModule:
    return fx.symbolic_trace(MiniResNet())


@dataclass(frozen=True)
class ZooModel:
    """A named model factory and the shape of its example input (token ids if ``vocab``)."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    vocab: int = 0

    def build(self, seed: int = 0) -> nn.Module:
        """A fresh model with weights from ``seed``, in eval mode (global RNG left as is)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = self.factory()
            _randomize_batch_norms(model)
        return model.eval()

    def example(self, seed: int = 1) -> torch.Tensor:
        """An example input batch."""
        generator = torch.Generator().manual_seed(seed)
        if self.vocab:
            return torch.randint(0, self.vocab, self.input_shape, generator=generator)
        return torch.randn(self.input_shape, generator=generator)


ZOO = (
    ZooModel("resnet", MiniResNet, (2, 3, 8, 8)),
    ZooModel("mobilenet", MobileNetBlock, (2, 3, 8, 8)),
    ZooModel("conv1d", Conv1dNet, (2, 4, 16)),
    ZooModel("conv3d", Conv3dNet, (2, 2, 5, 6, 6)),
    ZooModel("decoder2d", Decoder2d, (2, 8)),
    ZooModel("transpose1d", Transpose1dNet, (2, 6, 7)),
    ZooModel("transpose3d", Transpose3dNet, (2, 4, 2, 3, 3)),
    ZooModel("tied_mlp", TiedMLP, (3, 16)),
    ZooModel("containers", Containers, (3, 8)),
    ZooModel("tied_embedding", TiedEmbeddingLM, (2, 6), vocab=20),
    ZooModel("gpt", MiniGPT, (2, 6), vocab=24),
    ZooModel("embedding_bag", BagClassifier, (3, 5), vocab=30),
    ZooModel("fx_resnet", _traced_resnet, (2, 3, 8, 8)),
)

# Layers holding several weight matrices (attention, recurrent): tests/test_multi_weight.py.
MULTI_ZOO = (
    ZooModel("transformer", TransformerNet, (2, 5, 16)),
    ZooModel("gpt_attention", GPTWithAttention, (2, 6), vocab=24),
    ZooModel("recurrent", RecurrentNet, (3, 7, 6)),
)

# Kept out of ZOO so that the tests over the zoo are not all about this one case.
SHARED_MODULE = ZooModel("shared_module", SharedModule, (2, 4, 6, 6))

BY_NAME = {entry.name: entry for entry in (*ZOO, *MULTI_ZOO, SHARED_MODULE)}

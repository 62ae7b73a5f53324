"""The post-LayerNorm transformer encoder shared by BERT, RoBERTa and DistilBERT, driven by a layout table.

Sites (one table per architecture file gives the module names):

| site                     | config field          | writers                                   | readers                          | kind      |
|--------------------------|-----------------------|-------------------------------------------|----------------------------------|-----------|
| `<layers>.{i}` FFN       | intermediate width    | FFN input dense (rows)                    | FFN output dense (columns)       | nonlinear |
| residual stream (hidden) | hidden width          | embeddings, attention output, FFN output  | Q/K/V, FFN input, head input     | nonlinear |
| attention inner, per head| hidden / heads        | Q, K (shared rotation), V                 | attention output dense (columns) | linear    |
| head (pooler) width      | tied to hidden width  | head input dense (rows)                   | head output (columns)            | nonlinear |

The residual stream passes through LayerNorms, which are not rotation-equivariant (DESIGN §8): a rotation folded
through them breaks the model even at full width. In the stock format it is therefore reduced by keeping
coordinates (pivoted QR on the kept eigenvectors), slicing every LayerNorm with them and refitting each reader by
least squares on the second moment at its own input. The attention inner width must stay `hidden / heads` per
head in the stock architecture, so it follows the hidden width in one of two ways (`RMTKDConfig.head_reduction`):
`shrink` rotates each head onto the leading eigenvectors of its query/key (shared, so scores keep their form) and
value activations, with the score scale corrected for the new head size; `prune` keeps whole heads, those whose
share of the attention output has the largest second moment, and drops the others. Every step is exact when
nothing is cut.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..configuration import RMTKDConfig
from ..covariance import merged
from ..projection import (
    blocks,
    refit_reader_weight,
    rotate_linear_inputs,
    rotate_linear_outputs,
    select_channels,
    set_submodule,
    slice_embedding,
    slice_layer_norm,
    slice_linear_inputs,
    slice_linear_outputs,
)
from .base import Adapter, CapturePoint, Site


@dataclass(frozen=True)
class EncoderLayout:
    """Module paths (state-dict names) and config fields of one encoder family; per-layer paths are relative."""

    embeddings: Tuple[str, ...]
    embeddings_norm: str
    layers: str
    query: str
    key: str
    value: str
    attention_output: str
    attention_norm: str
    ffn_input: str
    ffn_output: str
    output_norm: str
    head_input: str
    head_output: str
    hidden_field: str
    intermediate_field: str
    heads_field: str
    layers_field: str


class TransformerEncoderAdapter(Adapter):
    """Adapter for post-LN encoders described by an `EncoderLayout` (subclasses set `layout` and `model_types`)."""

    layout: EncoderLayout

    # --- reading the structure -------------------------------------------------------------------------------
    def _layer(self, index: int, relative: str) -> str:
        return f"{self.layout.layers}.{index}.{relative}"

    def _num_layers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.layout.layers_field))

    def _hidden_inputs(self, model: nn.Module) -> List[CapturePoint]:
        """The residual stream after each LayerNorm that writes it: embeddings, then every sublayer."""
        points = [CapturePoint(self.layout.embeddings_norm)]
        for i in range(self._num_layers(model)):
            points.append(CapturePoint(self._layer(i, self.layout.attention_norm)))
            points.append(CapturePoint(self._layer(i, self.layout.output_norm)))
        return points

    def sites(self, model: nn.Module) -> List[Site]:
        lay = self.layout
        n_layers = self._num_layers(model)
        hidden = self._hidden_inputs(model)
        attention = tuple(
            CapturePoint(self._layer(i, name)) for i in range(n_layers) for name in (lay.query, lay.key, lay.value)
        ) + tuple(CapturePoint(self._layer(i, lay.attention_output), side="input") for i in range(n_layers))
        sites = [
            Site(
                name="hidden",
                kind="hidden",
                dim=int(getattr(model.config, lay.hidden_field)),
                config_field=lay.hidden_field,
                layer=None,
                path="nonlinear",
                captures=tuple(hidden),
                writers=lay.embeddings
                + tuple(self._layer(i, n) for i in range(n_layers) for n in (lay.attention_output, lay.ffn_output)),
                readers=tuple(
                    self._layer(i, n) for i in range(n_layers) for n in (lay.query, lay.key, lay.value, lay.ffn_input)
                )
                + (lay.head_input,),
                norms=(lay.embeddings_norm,)
                + tuple(self._layer(i, n) for i in range(n_layers) for n in (lay.attention_norm, lay.output_norm)),
                extra_captures=attention + (
                    CapturePoint(lay.head_input, side="input", layout="vector"),
                    CapturePoint(lay.head_output, side="input", layout="vector"),
                ),
            )
        ]
        for i in range(n_layers):
            ffn_output = model.get_submodule(self._layer(i, lay.ffn_output))
            sites.append(
                Site(
                    name=self._layer(i, "ffn"),
                    kind="ffn",
                    dim=ffn_output.in_features,
                    config_field=lay.intermediate_field,
                    layer=i,
                    path="nonlinear",
                    captures=(CapturePoint(self._layer(i, lay.ffn_output), side="input"),),
                    writers=(self._layer(i, lay.ffn_input),),
                    readers=(self._layer(i, lay.ffn_output),),
                )
            )
        return sites

    def heads_constraint(self, model: nn.Module, site: Site) -> Optional[int]:
        return int(getattr(model.config, self.layout.heads_field)) if site.kind == "hidden" else None

    def kept_width(self, model: nn.Module, site: Site, rank: int, config: RMTKDConfig) -> int:
        """For the hidden width, align each head's size (hidden / heads) to `width_multiple`: attention runs as
        per-head matmuls of that inner size, and a 14-wide head (168 / 12) wastes the vector units a 16-wide one
        fills. Pruning whole heads instead rounds to a multiple of the unchanged head size."""
        if site.kind != "hidden":
            return super().kept_width(model, site, rank, config)
        from ..rmt import round_width

        heads = self.heads_constraint(model, site)
        rank = min(max(rank, config.min_width), site.dim)
        if config.head_reduction == "prune":
            return round_width(rank, site.dim, math.lcm(config.width_multiple, site.dim // heads))
        return round_width(rank, site.dim, config.width_multiple * heads, num_heads=heads)

    # --- surgery ---------------------------------------------------------------------------------------------
    def reduce(self, model, sites, widths, stats, config: RMTKDConfig) -> None:
        for site in sites:
            if site.kind == "hidden":
                self._reduce_hidden(model, site, widths[site.name], stats, config)
            elif site.kind == "ffn":
                self._reduce_ffn(model, site, widths[site.name], stats, config)
            else:
                raise ValueError(f"{type(self).__name__} has no site of kind {site.kind!r}.")
        ffn_sites = [s for s in sites if s.kind == "ffn"]
        if ffn_sites:
            self._record_ffn_widths(model, {s.layer: widths[s.name] for s in ffn_sites}, config.output_format)
        if any(s.kind == "hidden" for s in sites):
            # Attention modules cache the head size and score scale of the old width: rebuild from the new config
            # so the in-memory model is exactly what `from_pretrained` will build from the saved folder.
            model = rebuild_from_config(model)
        return model

    def _refit_and_slice_reader(self, model, path, keep, sigma, ridge) -> None:
        reader = model.get_submodule(path)
        weight = refit_reader_weight(reader.weight, sigma, keep, ridge)
        set_submodule(model, path, slice_linear_inputs(reader, keep, weight))

    def _reduce_ffn(self, model, site: Site, width: int, stats, config: RMTKDConfig) -> None:
        acc = stats[site.captures[0].key]
        eig = acc.eigh(centered=config.centered)
        keep = select_channels(eig.eigenvectors, width)
        lay = self.layout
        writer_path, reader_path = self._layer(site.layer, lay.ffn_input), self._layer(site.layer, lay.ffn_output)
        set_submodule(model, writer_path, slice_linear_outputs(model.get_submodule(writer_path), keep))
        self._refit_and_slice_reader(model, reader_path, keep, acc.second_moment(), config.ridge)

    def _record_ffn_widths(self, model, widths_by_layer: Dict[int, int], output_format: str) -> None:
        field_name = self.layout.intermediate_field
        if output_format == "stock":
            values = set(widths_by_layer.values())
            if len(values) != 1:
                raise ValueError(
                    f"The stock format needs one `{field_name}` for every layer, got widths {sorted(values)}; "
                    "use `output_format='per-layer'`."
                )
            setattr(model.config, field_name, values.pop())
        else:
            per_layer = per_layer_widths(model.config)
            for layer, width in widths_by_layer.items():
                per_layer[layer] = {field_name: int(width)}
            # transformers' heterogeneous-layer format (DESIGN §3); global reads stay allowed because the stock
            # modeling code still reads the global width when it builds the layers we then resize.
            model.config.allow_global_per_layer_attribute_access = True
            model.config.per_layer_config = per_layer

    def _reduce_hidden(self, model, site: Site, width: int, stats, config: RMTKDConfig) -> None:
        lay, ridge = self.layout, config.ridge
        eig = merged([stats[p.key] for p in site.captures]).eigh(centered=config.centered)
        keep = select_channels(eig.eigenvectors, width)
        heads = int(getattr(model.config, lay.heads_field))
        old_head_dim = site.dim // heads
        prune = config.head_reduction == "prune"
        if prune and width % old_head_dim:
            raise ValueError(
                f"`head_reduction='prune'` keeps whole heads of {old_head_dim} channels, so the hidden width must be a "
                f"multiple of {old_head_dim}, got {width}; `kept_width` rounds to one."
            )
        kept_heads = width // old_head_dim if prune else heads
        new_head_dim = old_head_dim if prune else width // heads

        for path in lay.embeddings:
            set_submodule(model, path, slice_embedding(model.get_submodule(path), keep))
        set_submodule(model, lay.embeddings_norm, slice_layer_norm(model.get_submodule(lay.embeddings_norm), keep))

        stream_in = CapturePoint(lay.embeddings_norm)
        for i in range(self._num_layers(model)):
            sigma_in = stats[stream_in.key].second_moment()
            q_path, k_path, v_path = (self._layer(i, n) for n in (lay.query, lay.key, lay.value))
            for path in (q_path, k_path, v_path):
                self._refit_and_slice_reader(model, path, keep, sigma_in, ridge)
            out_path = self._layer(i, lay.attention_output)
            output = model.get_submodule(out_path)
            if prune:
                context = stats[CapturePoint(out_path, side="input").key].second_moment()
                inner = _strongest_heads(output.weight[keep.to(output.weight.device)], context, heads, kept_heads)
                for path in (q_path, k_path, v_path):
                    set_submodule(model, path, slice_linear_outputs(model.get_submodule(path), inner))
                output = slice_linear_inputs(output, inner)
            else:
                qk_rotation, v_rotation = self._head_rotations(
                    stats, q_path, k_path, v_path, heads, old_head_dim, new_head_dim
                )
                query = rotate_linear_outputs(model.get_submodule(q_path), qk_rotation)
                with torch.no_grad():  # scores are divided by √head_dim: keep q·k/√d unchanged at the new size
                    scale = math.sqrt(new_head_dim / old_head_dim)
                    query.weight.mul_(scale)
                    if query.bias is not None:
                        query.bias.mul_(scale)
                set_submodule(model, q_path, query)
                set_submodule(model, k_path, rotate_linear_outputs(model.get_submodule(k_path), qk_rotation))
                set_submodule(model, v_path, rotate_linear_outputs(model.get_submodule(v_path), v_rotation))
                output = rotate_linear_inputs(output, v_rotation)
            set_submodule(model, out_path, slice_linear_outputs(output, keep))
            attn_norm = self._layer(i, lay.attention_norm)
            set_submodule(model, attn_norm, slice_layer_norm(model.get_submodule(attn_norm), keep))

            sigma_mid = stats[CapturePoint(attn_norm).key].second_moment()
            self._refit_and_slice_reader(model, self._layer(i, lay.ffn_input), keep, sigma_mid, ridge)
            ffn_out = self._layer(i, lay.ffn_output)
            set_submodule(model, ffn_out, slice_linear_outputs(model.get_submodule(ffn_out), keep))
            out_norm = self._layer(i, lay.output_norm)
            set_submodule(model, out_norm, slice_layer_norm(model.get_submodule(out_norm), keep))
            stream_in = CapturePoint(out_norm)

        # Task head: its first dense reads only the [CLS] vector of the stream, so it is refitted on the second
        # moment of that vector, not of every token; its width is tied to the hidden width by the stock config, so
        # it loses channels too, chosen on the head's own activations.
        head_in = stats[CapturePoint(lay.head_input, side="input", layout="vector").key]
        self._refit_and_slice_reader(model, lay.head_input, keep, head_in.second_moment(), ridge)
        head_acc = stats[CapturePoint(lay.head_output, side="input", layout="vector").key]
        head_keep = select_channels(head_acc.eigh(centered=config.centered).eigenvectors, width)
        set_submodule(model, lay.head_input, slice_linear_outputs(model.get_submodule(lay.head_input), head_keep))
        self._refit_and_slice_reader(model, lay.head_output, head_keep, head_acc.second_moment(), ridge)
        setattr(model.config, lay.hidden_field, width)
        setattr(model.config, lay.heads_field, kept_heads)

    @staticmethod
    def _head_rotations(stats, q_path, k_path, v_path, heads, old_head_dim, new_head_dim):
        """Block-diagonal projections (width × dim) onto each head's leading query/key and value directions.

        Queries and keys share one rotation per head so that q·k keeps its form; the query and key second moments
        are each normalised by their trace before summing so neither dominates by scale.
        """
        sizes = [old_head_dim] * heads
        sigma_q = blocks(stats[f"{q_path}:output"].second_moment(), sizes)
        sigma_k = blocks(stats[f"{k_path}:output"].second_moment(), sizes)
        sigma_v = blocks(stats[f"{v_path}:output"].second_moment(), sizes)
        qk = torch.zeros(new_head_dim * heads, old_head_dim * heads, dtype=torch.float64)
        v = torch.zeros_like(qk)
        for h in range(heads):
            rows = slice(h * new_head_dim, (h + 1) * new_head_dim)
            cols = slice(h * old_head_dim, (h + 1) * old_head_dim)
            joint = sigma_q[h] / sigma_q[h].trace().clamp_min(1e-12) + sigma_k[h] / sigma_k[h].trace().clamp_min(1e-12)
            qk[rows, cols] = _leading_directions(joint, new_head_dim)
            v[rows, cols] = _leading_directions(sigma_v[h], new_head_dim)
        return qk, v

    # --- registered per-layer format ----------------------------------------------------------------------------
    def resize_per_layer(self, model: nn.Module) -> None:
        lay = self.layout
        for layer, fields in per_layer_widths(model.config).items():
            width = int(fields[lay.intermediate_field])
            writer_path, reader_path = self._layer(layer, lay.ffn_input), self._layer(layer, lay.ffn_output)
            keep = torch.arange(width)
            set_submodule(model, writer_path, slice_linear_outputs(model.get_submodule(writer_path), keep))
            set_submodule(model, reader_path, slice_linear_inputs(model.get_submodule(reader_path), keep))


def _strongest_heads(output_weight: torch.Tensor, context_moment: torch.Tensor, heads: int, kept: int) -> torch.Tensor:
    """Inner (Q/K/V output) indices of the `kept` heads whose share of the attention output, W_h c_h, has the largest
    second moment tr(W_h Σ_h W_hᵀ) (Σ_h: the head's block of the context second moment), in their original order.

    Energy at the output rather than at the values, because that is what the residual stream receives: a head
    whose values are large but whose output columns are small changes little when dropped.
    """
    head_dim = output_weight.shape[1] // heads
    weights = output_weight.detach().to("cpu", torch.float64).split(head_dim, dim=1)
    moments = blocks(context_moment.to("cpu", torch.float64), [head_dim] * heads)
    energy = torch.stack([(weight @ moment * weight).sum() for weight, moment in zip(weights, moments)])
    chosen = torch.topk(energy, kept).indices.sort().values
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in chosen.tolist()])


def rebuild_from_config(model: nn.Module) -> nn.Module:
    """A fresh model of the same class built from `model.config`, carrying over every weight (same device/dtype)."""
    from ..modeling import per_layer_classes_for

    model_cls = per_layer_classes_for(model.config.model_type)[1] if per_layer_widths(model.config) else type(model)
    reference = next(model.parameters())
    rebuilt = model_cls(model.config).to(device=reference.device, dtype=reference.dtype)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.train(model.training)
    return rebuilt


def per_layer_widths(config) -> Dict[int, Dict[str, int]]:
    """The `per_layer_config` of a config as a plain `{layer: {field: width}}` dict (empty when homogeneous)."""
    raw = config.to_dict().get("per_layer_config") or {}
    return {int(layer): dict(fields) for layer, fields in raw.items()}


def _leading_directions(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` leading eigenvectors of a symmetric matrix as orthonormal rows (count × dim)."""
    _, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return vectors.flip(1)[:, :count].T

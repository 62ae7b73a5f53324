"""The post-LayerNorm transformer encoder shared by BERT, RoBERTa and DistilBERT, driven by a layout table.

Sites (one table per architecture file gives the module names):

| site                     | config field          | writers                                   | readers                          | kind      |
|--------------------------|-----------------------|-------------------------------------------|----------------------------------|-----------|
| `<layers>.{i}` FFN       | intermediate width    | FFN input dense (rows)                    | FFN output dense (columns)       | nonlinear |
| residual stream (hidden) | hidden width          | embeddings, attention output, FFN output  | Q/K/V, FFN input, head input     | nonlinear |
| attention inner, per head| hidden / heads        | Q, K (shared rotation), V                 | attention output dense (columns) | linear    |
| head (pooler) width      | tied to hidden width  | head input dense (rows)                   | head output (columns)            | nonlinear |

The residual stream passes through LayerNorms, which are not rotation-equivariant (DESIGN §8): a rotation folded
through stock LayerNorms breaks the model even at full width. It is cut in one of two ways
(`RMTKDConfig.hidden_cut`):

- `coordinates` (stock format): keep k coordinates (`RMTKDConfig.channel_selection`), slice every LayerNorm with
  them, its γ and β corrected for normalising over k coordinates instead of d (`slice_layer_norm_rescaled`), and
  refit each reader by least squares on the second moment at its own input.
- `rotation` (registered per-layer format): every stretch of the stream between two LayerNorms (a *segment*: the
  embeddings' sum, then the output of each LayerNorm with the sublayer output added to it) is rotated onto the
  leading k directions of its own second moment; writers and readers fold the rotation (readers refitted on their
  input), and each LayerNorm becomes the exact `RotatedLayerNorm` from its input segment's basis to its output's.
  The config records `rotated_layer_norm_dim` (the LayerNorms' original width) so the registered type rebuilds them.
 The FFN and residual sites are cut by walking their tables
(`Site.writers`, `readers`, `reader_inputs`, `norms`; see `Adapter.cut_site`); two steps are not table walks and
are written out here:

- The attention inner width must stay `hidden / heads` per head in the stock architecture, so it follows the hidden
  width in one of two ways (`RMTKDConfig.head_reduction`): `shrink` rotates each head onto the leading eigenvectors
  of its query/key (shared, so scores keep their form) and value activations, with the score scale corrected for the
  new head size; `prune` keeps whole heads, those whose share of the attention output has the largest second moment,
  and drops the others. This edits Q/K/V outputs and the attention output's inputs, after the readers' refit and
  before the writers are sliced.
- The task head's inner width is tied to the hidden width by the stock config, so it loses channels too, chosen on
  the head's own activations (its first dense is an ordinary reader of the stream, refitted on the pooled [CLS]
  vector it reads).

Every step is exact when nothing is cut.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..configuration import RMTKDConfig
from ..layers import RotatedLayerNorm
from ..projection import (
    blocks,
    leading_directions,
    project_norm,
    refit_and_slice_reader,
    refit_projected_reader,
    rotate_embedding,
    rotate_linear_inputs,
    rotate_linear_outputs,
    set_submodule,
    slice_layer_norm_rescaled,
    slice_linear_inputs,
    slice_linear_outputs,
    slice_norm,
    slice_writer,
)
from .base import Adapter, CapturePoint, Site, choose_channels, per_layer_widths, rebuild


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
    architectures = ("ForSequenceClassification",)

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

    def _norm_paths(self, model: nn.Module) -> Tuple[str, ...]:
        """Every LayerNorm of the residual stream, in stream order: the embeddings', then each layer's two."""
        lay = self.layout
        return (lay.embeddings_norm,) + tuple(
            self._layer(i, n) for i in range(self._num_layers(model)) for n in (lay.attention_norm, lay.output_norm)
        )

    def sites(self, model: nn.Module) -> List[Site]:
        lay = self.layout
        n_layers = self._num_layers(model)
        hidden = self._hidden_inputs(model)
        attention = tuple(
            CapturePoint(self._layer(i, name)) for i in range(n_layers) for name in (lay.query, lay.key, lay.value)
        ) + tuple(CapturePoint(self._layer(i, lay.attention_output), side="input") for i in range(n_layers))
        # Each layer's Q/K/V read the stream after the previous LayerNorm (the embeddings' for layer 0), its FFN input
        # reads it after the attention LayerNorm; the task head's first dense reads the pooled [CLS] vector.
        readers, reader_inputs = [], []
        for i in range(n_layers):
            readers += [self._layer(i, n) for n in (lay.query, lay.key, lay.value, lay.ffn_input)]
            reader_inputs += [hidden[2 * i]] * 3 + [hidden[2 * i + 1]]
        readers.append(lay.head_input)
        reader_inputs.append(CapturePoint(lay.head_input, side="input", layout="vector"))
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
                readers=tuple(readers),
                reader_inputs=tuple(reader_inputs),
                norms=self._norm_paths(model),
                # The LayerNorms' inputs give the rotation cut each segment's far end (and the embeddings' sum).
                extra_captures=attention
                + (CapturePoint(lay.head_output, side="input", layout="vector"),)
                + tuple(CapturePoint(path, side="input") for path in self._norm_paths(model)),
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
                    reader_inputs=(CapturePoint(self._layer(i, lay.ffn_output), side="input"),),
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

    def parameters_after_cut(self, model, sites, widths, stats=None, config: Optional[RMTKDConfig] = None) -> int:
        """The parameter count `reduce` would leave: the model's class built on the meta device (no memory) from the
        config the cut would write, its layers resized as the registered format resizes them. The number of heads
        does not change it (the attention inner width follows the hidden width either way)."""
        config = config or RMTKDConfig()
        lay = self.layout
        new_config = copy.deepcopy(model.config)
        ffn_widths = {s.layer: widths[s.name] for s in sites if s.kind == "ffn"}
        for site in sites:
            if site.kind == "hidden":
                width = widths[site.name]
                setattr(new_config, lay.hidden_field, width)
                setattr(new_config, lay.heads_field, math.gcd(width, int(getattr(model.config, lay.heads_field))))
                if config.hidden_cut == "rotation" and getattr(new_config, "rotated_layer_norm_dim", None) is None:
                    new_config.rotated_layer_norm_dim = site.dim
        if ffn_widths:
            self._record_ffn_widths(new_config, ffn_widths, config.output_format)
        with torch.device("meta"):
            built = type(model)(new_config)
            self.resize_per_layer(built)
        return sum(p.numel() for p in built.parameters())

    # --- surgery ---------------------------------------------------------------------------------------------
    def reduce(self, model, sites, widths, stats, config: RMTKDConfig) -> nn.Module:
        for site in sites:
            if site.kind == "hidden":
                self._reduce_hidden(model, site, widths[site.name], stats, config)
            elif site.kind == "ffn":
                self.cut_site(model, site, widths[site.name], stats, config)
            else:
                raise ValueError(f"{type(self).__name__} has no site of kind {site.kind!r}.")
        ffn_sites = [s for s in sites if s.kind == "ffn"]
        if ffn_sites:
            self._record_ffn_widths(model.config, {s.layer: widths[s.name] for s in ffn_sites}, config.output_format)
        if any(s.kind == "hidden" for s in sites):
            # Attention modules cache the head size and score scale of the old width: rebuild from the new config
            # so the in-memory model is exactly what `from_pretrained` will build from the saved folder.
            model = rebuild(model)
        return model

    def _record_ffn_widths(self, config, widths_by_layer: Dict[int, int], output_format: str) -> None:
        """Write the FFN widths into `config`: one `intermediate_size` (stock) or `per_layer_config` entries."""
        field_name = self.layout.intermediate_field
        if output_format == "stock":
            values = set(widths_by_layer.values())
            if len(values) != 1:
                raise ValueError(
                    f"The stock format needs one `{field_name}` for every layer, got widths {sorted(values)}; "
                    "use `output_format='per-layer'`."
                )
            setattr(config, field_name, values.pop())
        else:
            per_layer = per_layer_widths(config)
            for layer, width in widths_by_layer.items():
                per_layer[layer] = {field_name: int(width)}
            # transformers' heterogeneous-layer format (DESIGN §3); global reads stay allowed because the stock
            # modeling code still reads the global width when it builds the layers we then resize.
            config.allow_global_per_layer_attribute_access = True
            config.per_layer_config = per_layer

    def _reduce_hidden(self, model, site: Site, width: int, stats, config: RMTKDConfig) -> None:
        lay = self.layout
        heads = int(getattr(model.config, lay.heads_field))
        old_head_dim = site.dim // heads
        prune = config.head_reduction == "prune"
        if prune and width % old_head_dim:
            raise ValueError(
                f"`head_reduction='prune'` keeps whole heads of {old_head_dim} channels, so the hidden width must be a "
                f"multiple of {old_head_dim}, got {width}; `kept_width` rounds to one."
            )
        kept_heads = width // old_head_dim if prune else heads
        rotation = config.hidden_cut == "rotation"
        if rotation:
            bases = self._segment_bases(model, site, width, stats)
            self._rotate_readers(model, site, bases, stats, config.ridge)
        else:
            keep = self.site_channels(site, width, stats, config)
            # Readers first: each is refitted on its own input before the attention step narrows Q/K/V's outputs.
            self.refit_readers(model, site, keep, stats, config.ridge)
        for i in range(self._num_layers(model)):
            if prune:
                # The attention output's rows as the kept stream receives them (its segment is the one Q/K/V read).
                weight = model.get_submodule(self._layer(i, lay.attention_output)).weight
                written = bases[2 * i].to(weight) @ weight if rotation else weight[keep.to(weight.device)]
                self._prune_heads(model, i, written, stats, heads, kept_heads)
            else:
                self._shrink_heads(model, i, stats, heads, old_head_dim, width // heads)
        # Writers after the attention step: the attention output's inputs change there, its outputs here.
        if rotation:
            self._rotate_writers_and_norms(model, bases)
            if getattr(model.config, "rotated_layer_norm_dim", None) is None:
                model.config.rotated_layer_norm_dim = site.dim
        else:
            self._slice_writers_and_norms(model, site, keep, stats)
        self._reduce_head_width(model, width, stats, config)
        setattr(model.config, lay.hidden_field, width)
        setattr(model.config, lay.heads_field, kept_heads)

    def _slice_writers_and_norms(self, model, site: Site, keep: torch.Tensor, stats) -> None:
        """The coordinate cut's writers and LayerNorms: writers sliced; each stock LayerNorm sliced with γ and β
        corrected for normalising over the kept coordinates only (`slice_layer_norm_rescaled`, from the statistics
        of its input); an already rotated one sliced exactly."""
        for path in site.writers:
            set_submodule(model, path, slice_writer(model.get_submodule(path), keep))
        for path in site.norms:
            norm = model.get_submodule(path)
            if isinstance(norm, nn.LayerNorm):
                inputs = stats[CapturePoint(path, side="input").key]
                norm = slice_layer_norm_rescaled(norm, keep, inputs.second_moment(), inputs.mean())
            else:
                norm = slice_norm(norm, keep)
            set_submodule(model, path, norm)

    # --- the rotation cut of the residual stream ----------------------------------------------------------------
    def _segment_bases(self, model, site: Site, width: int, stats) -> Dict[int, torch.Tensor]:
        """The basis (k × d, orthonormal rows) of every segment of the stream: -1 is the embeddings' sum (the first
        LayerNorm's input), j the output of LayerNorm j with what the next sublayer adds to it (LayerNorm j+1's
        input). Each is the leading directions of its second moments at both ends, each end normalised by its
        trace so that neither dominates by scale; uncentred, since the stream's mean is signal the bias carries."""
        norms = self._norm_paths(model)

        def moment(point: CapturePoint) -> torch.Tensor:
            sigma = stats[point.key].second_moment().to(torch.float64).cpu()
            return sigma / torch.trace(sigma).clamp_min(1e-12)

        bases = {-1: leading_directions(moment(CapturePoint(norms[0], side="input")), width)}
        for j, path in enumerate(norms):
            joint = moment(CapturePoint(path))
            if j + 1 < len(norms):
                joint = joint + moment(CapturePoint(norms[j + 1], side="input"))
            bases[j] = leading_directions(joint, width)
        return bases

    def _rotate_readers(self, model, site: Site, bases: Dict[int, torch.Tensor], stats, ridge: float) -> None:
        """Fold each segment's basis into the linears that read it (the site's reader table), refitted on their own
        input: a reader whose input is LayerNorm j's output reads segment j; the task head, which reads the pooled
        [CLS] vector, reads the last segment."""
        last = len(site.captures) - 1
        for path, point in zip(site.readers, site.reader_inputs):
            segment = site.captures.index(point) if point in site.captures else last
            sigma = stats[point.key].second_moment()
            set_submodule(model, path, refit_projected_reader(model.get_submodule(path), bases[segment], sigma, ridge))

    def _rotate_writers_and_norms(self, model, bases: Dict[int, torch.Tensor]) -> None:
        """Fold each segment's basis into what writes it (embeddings; the attention and FFN outputs add to the
        segments of the LayerNorms before them) and turn LayerNorm j into the exact fold from segment j − 1 to j."""
        lay = self.layout
        for path in lay.embeddings:
            set_submodule(model, path, rotate_embedding(model.get_submodule(path), bases[-1]))
        for i in range(self._num_layers(model)):
            for name, segment in ((lay.attention_output, 2 * i), (lay.ffn_output, 2 * i + 1)):
                path = self._layer(i, name)
                set_submodule(model, path, rotate_linear_outputs(model.get_submodule(path), bases[segment]))
        for j, path in enumerate(self._norm_paths(model)):
            set_submodule(model, path, project_norm(model.get_submodule(path), bases[j - 1], bases[j]))

    def _attention_paths(self, layer: int) -> Tuple[str, str, str, str]:
        lay = self.layout
        return tuple(self._layer(layer, n) for n in (lay.query, lay.key, lay.value, lay.attention_output))

    def _prune_heads(self, model, layer: int, written: torch.Tensor, stats, heads: int, kept_heads: int) -> None:
        """Keep the `kept_heads` heads of a layer whose share of the attention output (`written`: its weight as the
        kept stream receives it) has the largest second moment (`_strongest_heads`): Q/K/V lose the other heads'
        outputs, the attention output its inputs from them."""
        q_path, k_path, v_path, out_path = self._attention_paths(layer)
        output = model.get_submodule(out_path)
        context = stats[CapturePoint(out_path, side="input").key].second_moment()
        inner = _strongest_heads(written, context, heads, kept_heads)
        for path in (q_path, k_path, v_path):
            set_submodule(model, path, slice_linear_outputs(model.get_submodule(path), inner))
        set_submodule(model, out_path, slice_linear_inputs(output, inner))

    def _shrink_heads(self, model, layer: int, stats, heads: int, old_head_dim: int, new_head_dim: int) -> None:
        """Rotate every head of a layer onto its leading query/key and value directions (`_head_rotations`), folded
        into Q/K/V's outputs and the attention output's inputs, with the score scale kept."""
        q_path, k_path, v_path, out_path = self._attention_paths(layer)
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
        set_submodule(model, out_path, rotate_linear_inputs(model.get_submodule(out_path), v_rotation))

    def _reduce_head_width(self, model, width: int, stats, config: RMTKDConfig) -> None:
        """The task head's inner width (its first dense's outputs, its output layer's inputs) is tied to the hidden
        width by the stock config: keep `width` of its channels, chosen on the head's own activations, and refit the
        output layer on them. (The first dense's inputs were refitted as a reader of the stream.)"""
        lay = self.layout
        head_acc = stats[CapturePoint(lay.head_output, side="input", layout="vector").key]
        head_keep = choose_channels(head_acc, width, config)
        set_submodule(model, lay.head_input, slice_linear_outputs(model.get_submodule(lay.head_input), head_keep))
        head_output = model.get_submodule(lay.head_output)
        set_submodule(
            model, lay.head_output,
            refit_and_slice_reader(head_output, head_keep, head_acc.second_moment(), config.ridge),
        )

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
            qk[rows, cols] = leading_directions(joint, new_head_dim)
            v[rows, cols] = leading_directions(sigma_v[h], new_head_dim)
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
        normalized_dim = getattr(model.config, "rotated_layer_norm_dim", None)
        if normalized_dim is not None:  # a rotation cut: every LayerNorm of the stream is a `RotatedLayerNorm`
            for path in self._norm_paths(model):
                norm = model.get_submodule(path)
                if isinstance(norm, nn.LayerNorm):
                    (width,) = norm.normalized_shape
                    rotated = RotatedLayerNorm(
                        width, width, normalized_dim, norm.eps, device=norm.weight.device, dtype=norm.weight.dtype
                    )
                    set_submodule(model, path, rotated)


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

"""Pre-RMSNorm decoder language models: Llama, Mistral and Qwen2 (`*ForCausalLM`), one layout, driven by a table.

The three families share every module name: a token embedding, layers of RMSNorm → rotary grouped-query attention →
residual, RMSNorm → SwiGLU MLP (`down_proj(act(gate_proj(x)) · up_proj(x))`) → residual, a final RMSNorm and a
language-model head that may share the embedding's weight (`tie_word_embeddings`). Module names below are short;
`DecoderLayout` holds the state-dict paths (`model.layers.{i}.self_attn.q_proj`, …):

| site                   | kind     | config field          | writers (rows)                        | readers (columns)                       | path      |
|------------------------|----------|-----------------------|---------------------------------------|-----------------------------------------|-----------|
| `layers.{i}.mlp`       | `ffn`    | `intermediate_size`   | `gate_proj`, `up_proj`                | `down_proj`                             | nonlinear |
| `layers.{i}.self_attn` | `heads`  | `num_attention_heads` | `q_proj`, `k_proj`, `v_proj`          | `o_proj`                                | linear    |
| `hidden`               | `hidden` | `hidden_size`         | `embed_tokens`, `o_proj`, `down_proj` | `q/k/v_proj`, `gate/up_proj`, `lm_head` | linear    |

The heads site also sets `num_key_value_heads`. The hidden site (the residual stream) has the norms every
`input_layernorm`, `post_attention_layernorm` and the final `norm`, whose outputs are where its readers read
(`Site.reader_inputs`).

- `ffn`: SiLU(gate) · up is not linear, so the cut keeps channels of the `down_proj` input
  (`RMTKDConfig.channel_selection`) and refits `down_proj` by least squares on that input's second moment: a pure
  table walk (`Adapter.cut_site`), as for an encoder's FFN.
- `heads`: the width is the attention output (the `o_proj` input, heads × `head_dim`), and it loses whole heads, so
  `head_dim` and the rotary embedding stay. Grouped-query attention shares one key/value head among the query heads
  of its group, so q, k and v cannot lose the same indices: a cut keeps g' whole groups and the same number r' of
  query heads from each (9 heads in 3 groups can become 6 in 3 groups or 6 in 2). The count comes from the spectrum,
  rounded up to a count g'·r' the layout allows (`allowed_head_counts`); the factorisation and the heads are those
  with the most output energy tr(W_h Σ_h W_hᵀ) (`plan_heads`). A head is dropped with its `o_proj` columns, nothing
  refitted: the cut equals the original with those columns zeroed.
- `hidden`: a pre-RMSNorm residual stream admits one exact global rotation (SliceGPT's computational invariance,
  DESIGN §9): fold each RMSNorm weight into the linears that read its output, rotate the stream onto the leading
  eigenvectors Q of its second moment (pooled over the embedding output and every layer's output), and give every
  RMSNorm the weight √(d/k) and ε·d/k, so the k-dimensional RMS equals the d-dimensional one. A tied head is untied
  (the embedding and the head are rotated differently), which adds `vocab × k` parameters: `parameters_after_cut`
  says what a cut would leave, so a size rule can skip a hidden cut that does not pay.

Every step is exact when nothing is cut. The stock format holds one `intermediate_size` and one head layout for every
layer; `head_dim` is written into the config explicitly (a narrower `hidden_size` must not change it). LlamaConfig
refuses `hidden_size % num_attention_heads != 0` when the model is built (Mistral and Qwen2 do not check), so for
Llama `kept_width` rounds to widths that keep it true and `reduce` refuses others before editing anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..configuration import RMTKDConfig
from ..covariance import merged
from ..projection import (
    blocks,
    norm_with_weight,
    rotate_embedding,
    rotate_linear_inputs,
    rotate_linear_outputs,
    set_submodule,
    slice_linear_inputs,
    slice_linear_outputs,
)
from .base import Adapter, CapturePoint, LayerwiseLayout, Site, per_layer_widths, rebuild, register_adapter

if TYPE_CHECKING:
    from ..covariance import SecondMomentAccumulator


@dataclass(frozen=True)
class DecoderLayout:
    """Module paths (state-dict names; per-layer paths relative to `layers.{i}`) and config fields of one decoder
    family, and whether its config refuses a hidden size that the number of attention heads does not divide."""

    embeddings: str = "model.embed_tokens"
    layers: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    query: str = "self_attn.q_proj"
    key: str = "self_attn.k_proj"
    value: str = "self_attn.v_proj"
    attention_output: str = "self_attn.o_proj"
    post_attention_norm: str = "post_attention_layernorm"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    hidden_field: str = "hidden_size"
    intermediate_field: str = "intermediate_size"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str = "num_key_value_heads"
    head_dim_field: str = "head_dim"
    layers_field: str = "num_hidden_layers"
    eps_field: str = "rms_norm_eps"
    tie_field: str = "tie_word_embeddings"
    heads_divide_hidden: bool = False


@dataclass(frozen=True)
class HeadPlan:
    """The attention heads one layer keeps: query heads and key/value groups, original indices in ascending order
    (so the kept query heads of each kept group stay contiguous, as grouped-query attention reads them)."""

    heads: Tuple[int, ...]
    groups: Tuple[int, ...]


@register_adapter
class LlamaAdapter(Adapter):
    """Adapter for pre-RMSNorm decoders with grouped-query attention described by a `DecoderLayout`.

    Subclasses for other families set `model_types` and `layout`.
    """

    model_types = ("llama",)
    architectures = ("ForCausalLM",)
    layout = DecoderLayout(heads_divide_hidden=True)

    # --- reading the structure -------------------------------------------------------------------------------
    def _layer(self, index: int, relative: str) -> str:
        return f"{self.layout.layers}.{index}.{relative}"

    def _num_layers(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.layout.layers_field))

    def head_dim(self, model: nn.Module) -> int:
        """The width of one attention head (the config's `head_dim`, else hidden / heads, as the modeling code reads
        it)."""
        config, lay = model.config, self.layout
        value = getattr(config, lay.head_dim_field, None)
        if value:
            return int(value)
        return int(getattr(config, lay.hidden_field)) // int(getattr(config, lay.heads_field))

    def layer_heads(self, model: nn.Module, layer: int) -> Tuple[int, int]:
        """(query heads, key/value groups) of a layer, read from its weights (a per-layer cut may differ by layer)."""
        head_dim = self.head_dim(model)
        query = model.get_submodule(self._layer(layer, self.layout.query))
        key = model.get_submodule(self._layer(layer, self.layout.key))
        return query.out_features // head_dim, key.out_features // head_dim

    def is_tied(self, model: nn.Module) -> bool:
        """Whether the language-model head shares the embedding's weight."""
        head = model.get_submodule(self.layout.lm_head)
        return head.weight is model.get_submodule(self.layout.embeddings).weight

    def layerwise_layout(self, model: nn.Module) -> LayerwiseLayout:
        """The decoder layers, then the final norm (whose output the head reads)."""
        return LayerwiseLayout(layers=self.layout.layers, tail=(self.layout.final_norm,))

    def _stream_points(self, model: nn.Module) -> List[CapturePoint]:
        """The residual stream: the embedding output, then every layer's output."""
        return [CapturePoint(self.layout.embeddings)] + [
            CapturePoint(f"{self.layout.layers}.{i}") for i in range(self._num_layers(model))
        ]

    def sites(self, model: nn.Module) -> List[Site]:
        lay = self.layout
        n_layers = self._num_layers(model)
        readers, reader_inputs = [], []
        for i in range(n_layers):
            attention_input = CapturePoint(self._layer(i, lay.input_norm))
            mlp_input = CapturePoint(self._layer(i, lay.post_attention_norm))
            readers += [self._layer(i, n) for n in (lay.query, lay.key, lay.value, lay.gate, lay.up)]
            reader_inputs += [attention_input] * 3 + [mlp_input] * 2
        readers.append(lay.lm_head)
        reader_inputs.append(CapturePoint(lay.final_norm))
        sites = [
            Site(
                name="hidden",
                kind="hidden",
                dim=int(getattr(model.config, lay.hidden_field)),
                config_field=lay.hidden_field,
                layer=None,
                path="linear",
                captures=tuple(self._stream_points(model)),
                writers=(lay.embeddings,)
                + tuple(self._layer(i, n) for i in range(n_layers) for n in (lay.attention_output, lay.down)),
                readers=tuple(readers),
                reader_inputs=tuple(reader_inputs),
                norms=tuple(
                    self._layer(i, n) for i in range(n_layers) for n in (lay.input_norm, lay.post_attention_norm)
                ) + (lay.final_norm,),
            )
        ]
        for i in range(n_layers):
            context = CapturePoint(self._layer(i, lay.attention_output), side="input")
            sites.append(
                Site(
                    name=self._layer(i, lay.attention),
                    kind="heads",
                    dim=model.get_submodule(self._layer(i, lay.attention_output)).in_features,
                    config_field=lay.heads_field,
                    layer=i,
                    path="linear",
                    captures=(context,),
                    writers=tuple(self._layer(i, n) for n in (lay.query, lay.key, lay.value)),
                    readers=(self._layer(i, lay.attention_output),),
                    reader_inputs=(context,),
                )
            )
        for i in range(n_layers):
            mlp_input = CapturePoint(self._layer(i, lay.down), side="input")
            sites.append(
                Site(
                    name=self._layer(i, lay.mlp),
                    kind="ffn",
                    dim=model.get_submodule(self._layer(i, lay.down)).in_features,
                    config_field=lay.intermediate_field,
                    layer=i,
                    path="nonlinear",
                    captures=(mlp_input,),
                    writers=(self._layer(i, lay.gate), self._layer(i, lay.up)),
                    readers=(self._layer(i, lay.down),),
                    reader_inputs=(mlp_input,),
                )
            )
        return sites

    def required_captures(self, sites: Sequence[Site]) -> List[CapturePoint]:
        """As `Adapter.required_captures`, less the reader inputs of the hidden site: its cut is a rotation folded
        exactly into every reader, nothing is refitted, so calibrating the RMSNorm outputs would be wasted work."""
        seen: Dict[str, CapturePoint] = {}
        for site in sites:
            reader_inputs = () if site.kind == "hidden" else site.reader_inputs
            for point in site.captures + reader_inputs + site.extra_captures:
                seen.setdefault(point.key, point)
        return list(seen.values())

    # --- widths ------------------------------------------------------------------------------------------------
    def heads_constraint(self, model: nn.Module, site: Site) -> Optional[int]:
        """The hidden width of a family whose config checks `hidden_size % num_attention_heads` (Llama) must stay a
        multiple of the head count."""
        if site.kind == "hidden" and self.layout.heads_divide_hidden:
            return int(_global(model.config, self.layout.heads_field))
        return None

    def allowed_head_counts(self, model: nn.Module, layer: int, hidden: Optional[int] = None) -> List[int]:
        """The head counts a layer can be cut to, ascending: those grouped-query attention allows
        (`grouped_head_counts`), and for a family whose config checks it only those dividing `hidden` (default: the
        current hidden size). The current count is always among them."""
        heads, groups = self.layer_heads(model, layer)
        counts = grouped_head_counts(heads, groups)
        if self.layout.heads_divide_hidden:
            hidden = int(getattr(model.config, self.layout.hidden_field)) if hidden is None else hidden
            counts = sorted({c for c in counts if hidden % c == 0} | {heads})
        return counts

    def kept_width(self, model: nn.Module, site: Site, rank: int, config: RMTKDConfig) -> int:
        """For a `heads` site: the fewest whole heads (`allowed_head_counts`) covering `rank` channels (at least
        `config.min_width`), times `head_dim`. `width_multiple` does not apply there: heads keep their size, so the
        per-head matmuls keep their alignment. Other sites: `Adapter.kept_width`."""
        if site.kind != "heads":
            return super().kept_width(model, site, rank, config)
        head_dim = self.head_dim(model)
        needed = math.ceil(min(max(rank, config.min_width), site.dim) / head_dim)
        count = min(c for c in self.allowed_head_counts(model, site.layer) if c >= needed)
        return count * head_dim

    def parameters_after_cut(
        self,
        model: nn.Module,
        sites: Sequence[Site],
        widths: Dict[str, int],
        stats: Optional[Dict[str, "SecondMomentAccumulator"]] = None,
        config: Optional[RMTKDConfig] = None,
    ) -> int:
        """The parameter count `reduce(model, sites, widths, stats, config)` would leave, without cutting anything.

        A hidden cut of a tied model can grow it: the untied head adds `vocab × k` parameters, more than the cut saves
        when k is close to d (SliceGPT's OPT-125M grew to 147M at 20%). A size rule compares this with
        `sum(p.numel() for p in model.parameters())` (tied weights counted once) and skips a cut that does not pay.
        Which key/value groups a heads cut keeps depends on the attention statistics (`plan_heads`) and on
        `config.output_format` (one factorisation for every layer in the stock format); without `stats` the count assumes
        the factorisation with the most groups, an upper bound. A cut `reduce` would refuse raises its error here.
        """
        lay = self.layout
        head_dim = self.head_dim(model)
        hidden = int(getattr(model.config, lay.hidden_field))
        tied = self.is_tied(model)
        for site in sites:
            if site.kind == "hidden":
                hidden, tied = widths[site.name], False
        heads = {i: self.layer_heads(model, i) for i in range(self._num_layers(model))}
        output_format = (config or RMTKDConfig()).output_format
        plans = self._head_plans(model, [s for s in sites if s.kind == "heads"], widths, stats, output_format, hidden)
        heads.update({layer: (len(plan.heads), len(plan.groups)) for layer, plan in plans.items()})
        ffn = {i: model.get_submodule(self._layer(i, lay.down)).in_features for i in heads}
        ffn.update({s.layer: widths[s.name] for s in sites if s.kind == "ffn"})

        def linear(path: str, in_features: int, out_features: int) -> int:
            return in_features * out_features + (out_features if model.get_submodule(path).bias is not None else 0)

        total = model.get_submodule(lay.embeddings).num_embeddings * hidden + hidden  # embedding, final norm
        if not tied:
            total += linear(lay.lm_head, hidden, model.get_submodule(lay.lm_head).out_features)
        for i, (query_heads, groups) in heads.items():
            shapes = {
                lay.query: (hidden, query_heads * head_dim), lay.key: (hidden, groups * head_dim),
                lay.value: (hidden, groups * head_dim), lay.attention_output: (query_heads * head_dim, hidden),
                lay.gate: (hidden, ffn[i]), lay.up: (hidden, ffn[i]), lay.down: (ffn[i], hidden),
            }
            total += 2 * hidden + sum(linear(self._layer(i, name), *shape) for name, shape in shapes.items())
        return total

    # --- surgery ---------------------------------------------------------------------------------------------
    def reduce(self, model, sites, widths, stats, config: RMTKDConfig) -> nn.Module:
        lay = self.layout
        by_kind: Dict[str, List[Site]] = {}
        for site in sites:
            if site.kind not in ("hidden", "heads", "ffn"):
                raise ValueError(f"{type(self).__name__} has no site of kind {site.kind!r}.")
            by_kind.setdefault(site.kind, []).append(site)
        # Every check before the first edit: a refused cut leaves the model as it was.
        hidden_site = by_kind.get("hidden", [None])[0]
        hidden = widths[hidden_site.name] if hidden_site is not None else int(getattr(model.config, lay.hidden_field))
        if "ffn" in by_kind and config.output_format == "stock":
            self._uniform(lay.intermediate_field, {s.layer: widths[s.name] for s in by_kind["ffn"]})
        plans = self._head_plans(model, by_kind.get("heads", []), widths, stats, config.output_format, hidden)
        if hidden_site is not None:
            self._check_hidden(model, hidden, plans)
        head_dim = self.head_dim(model)

        for site in by_kind.get("ffn", []):
            self.cut_site(model, site, widths[site.name], stats, config)
        if "ffn" in by_kind:
            self._record(model, {s.layer: {lay.intermediate_field: widths[s.name]} for s in by_kind["ffn"]},
                         config.output_format)
        for layer, plan in plans.items():
            self._prune_heads(model, layer, plan, head_dim)
        if plans:
            self._record(model, {
                layer: {lay.heads_field: len(plan.heads), lay.kv_heads_field: len(plan.groups)}
                for layer, plan in plans.items()
            }, config.output_format)
        if hidden_site is not None:
            self._rotate_hidden(model, hidden_site, hidden, stats)
        # A narrower hidden size must not change the head size the modeling code derives from it.
        setattr(model.config, lay.head_dim_field, head_dim)
        if plans or hidden_site is not None:
            # Attention modules cache their key/value grouping and RMSNorms their ε: rebuild from the new config so
            # the in-memory model is exactly what `from_pretrained` builds from the saved folder.
            model = rebuild(model)
        return model

    @staticmethod
    def _uniform(field_name: str, widths_by_layer: Dict[int, int]) -> int:
        values = set(widths_by_layer.values())
        if len(values) != 1:
            raise ValueError(
                f"The stock format needs one `{field_name}` for every layer, got widths {sorted(values)}; "
                "use `output_format='per-layer'`."
            )
        return values.pop()

    def _record(self, model, fields_by_layer: Dict[int, Dict[str, int]], output_format: str) -> None:
        """Write the new widths into the config: global fields in the stock format, `per_layer_config` otherwise."""
        if output_format == "stock":
            for fields in fields_by_layer.values():
                for name, value in fields.items():
                    setattr(model.config, name, int(value))
            return
        per_layer = per_layer_widths(model.config)
        for layer, fields in fields_by_layer.items():
            per_layer.setdefault(layer, {}).update({name: int(value) for name, value in fields.items()})
        # transformers' heterogeneous-layer format (DESIGN §3); global reads stay allowed because the stock modeling
        # code still reads the global widths when it builds the layers we then resize.
        model.config.allow_global_per_layer_attribute_access = True
        model.config.per_layer_config = per_layer

    def _check_hidden(self, model, hidden: int, plans: Dict[int, HeadPlan]) -> None:
        if not self.layout.heads_divide_hidden:
            return
        counts = {layer: len(plan.heads) for layer, plan in plans.items()}
        for layer in range(self._num_layers(model)):
            heads = counts.get(layer, self.layer_heads(model, layer)[0])
            if hidden % heads:
                raise ValueError(self._divisibility_message(model, heads, hidden))

    def _divisibility_message(self, model, heads: int, hidden: int) -> str:
        lay = self.layout
        return (
            f"`{lay.heads_field}` must divide `{lay.hidden_field}` in a {type(model.config).__name__}, which refuses "
            f"to build otherwise, got {heads} heads for a hidden size of {hidden}; cut to a head count that divides "
            f"the hidden size and a hidden size that the head count divides (`kept_width` rounds to both)."
        )

    # --- attention heads -----------------------------------------------------------------------------------------
    def head_energies(self, model: nn.Module, layer: int, stats) -> torch.Tensor:
        """Each query head's share of the attention output, as second moment: tr(W_h Σ_h W_hᵀ), W_h its `o_proj`
        columns, Σ_h its block of the `o_proj` input's second moment (float64, on the CPU)."""
        path = self._layer(layer, self.layout.attention_output)
        heads, _ = self.layer_heads(model, layer)
        head_dim = self.head_dim(model)
        weight = model.get_submodule(path).weight.detach().to("cpu", torch.float64)
        moment = stats[CapturePoint(path, side="input").key].second_moment().to("cpu", torch.float64)
        moments = blocks(moment, [head_dim] * heads)
        return torch.stack([(w @ m * w).sum() for w, m in zip(weight.split(head_dim, dim=1), moments)])

    def _head_plans(
        self, model, sites: Sequence[Site], widths: Dict[str, int], stats, output_format: str = "stock",
        hidden: Optional[int] = None,
    ) -> Dict[int, HeadPlan]:
        """The heads each layer of `sites` keeps; every width is checked first. The stock format gives every layer the
        same factorisation (one `num_key_value_heads`); the per-layer format chooses one per layer."""
        if not sites:
            return {}
        head_dim = self.head_dim(model)
        counts: Dict[int, int] = {}
        for site in sites:
            width = widths[site.name]
            heads, groups = self.layer_heads(model, site.layer)
            allowed = grouped_head_counts(heads, groups)
            if width % head_dim or width // head_dim not in allowed:
                raise ValueError(
                    f"Layer {site.layer} has {heads} attention heads of {head_dim} channels in {groups} key/value "
                    f"groups, so `{site.name}` can keep {[c * head_dim for c in allowed]} channels ({allowed} heads: "
                    f"whole groups, and as many query heads from each), got {width}."
                )
            counts[site.layer] = width // head_dim
        if self.layout.heads_divide_hidden:
            hidden = int(getattr(model.config, self.layout.hidden_field)) if hidden is None else hidden
            for count in counts.values():
                if hidden % count:
                    raise ValueError(self._divisibility_message(model, count, hidden))
        energies = {
            layer: self.head_energies(model, layer, stats) if stats is not None
            else torch.zeros(self.layer_heads(model, layer)[0], dtype=torch.float64)
            for layer in counts
        }
        groups = {layer: self.layer_heads(model, layer)[1] for layer in counts}
        if output_format == "stock":
            self._uniform(self.layout.heads_field, counts)
            layers = sorted(counts)
            return dict(zip(layers, plan_heads([energies[i] for i in layers], groups[layers[0]], counts[layers[0]])))
        return {layer: plan_heads([energies[layer]], groups[layer], counts[layer])[0] for layer in counts}

    def _prune_heads(self, model, layer: int, plan: HeadPlan, head_dim: int) -> None:
        """Q and `o_proj` keep the plan's query heads, K and V its key/value groups; nothing is refitted."""
        lay = self.layout

        def channels(indices: Tuple[int, ...]) -> torch.Tensor:
            return torch.cat([torch.arange(i * head_dim, (i + 1) * head_dim) for i in indices])

        heads, groups = channels(plan.heads), channels(plan.groups)
        for name, keep in ((lay.query, heads), (lay.key, groups), (lay.value, groups)):
            path = self._layer(layer, name)
            set_submodule(model, path, slice_linear_outputs(model.get_submodule(path), keep))
        path = self._layer(layer, lay.attention_output)
        set_submodule(model, path, slice_linear_inputs(model.get_submodule(path), heads))

    # --- the residual stream -------------------------------------------------------------------------------------
    def _rotate_hidden(self, model, site: Site, width: int, stats) -> None:
        """The exact global rotation of DESIGN §9 (SliceGPT), cut to `width` directions.

        Q holds the eigenvectors of the stream's uncentred second moment: the rotation is a projection without an
        offset, so the uncentred moment is the one whose leading directions lose the least energy, whatever
        `config.centered` chose for the spectrum. Readers take W·diag(γ)·Q[:, :k] (γ: the weight of the RMSNorm
        before them), writers (Qᵀ·W)[:k], the embedding E·Q[:, :k]; every RMSNorm then has weight √(d/k) and
        ε·d/k, since for the rotated stream y = (Qᵀx)[:k], ‖y‖²/k + ε·d/k = (d/k)(‖y‖²/d + ε), and ‖y‖ = ‖x‖ when
        nothing is cut.
        """
        lay = self.layout
        dim = site.dim
        sigma = merged([stats[point.key] for point in site.captures]).second_moment(centered=False)
        _, vectors = torch.linalg.eigh(sigma.to("cpu", torch.float64))
        projection = vectors.flip(1)[:, :width].T.contiguous()  # P = Q[:, :k]ᵀ, k × d

        def fold(norm_path: str) -> torch.Tensor:  # P diag(γ): the reader's rotation with the norm's weight folded in
            return projection * model.get_submodule(norm_path).weight.detach().to("cpu", torch.float64)[None, :]

        set_submodule(model, lay.embeddings, rotate_embedding(model.get_submodule(lay.embeddings), projection))
        for i in range(self._num_layers(model)):
            for norm, readers, writer in (
                (lay.input_norm, (lay.query, lay.key, lay.value), lay.attention_output),
                (lay.post_attention_norm, (lay.gate, lay.up), lay.down),
            ):
                rotation = fold(self._layer(i, norm))
                for reader in readers:
                    path = self._layer(i, reader)
                    set_submodule(model, path, rotate_linear_inputs(model.get_submodule(path), rotation))
                path = self._layer(i, writer)
                set_submodule(model, path, rotate_linear_outputs(model.get_submodule(path), projection))
        # The head is replaced by its own Linear, so a tied head is untied here.
        set_submodule(model, lay.lm_head, rotate_linear_inputs(model.get_submodule(lay.lm_head), fold(lay.final_norm)))
        scale = torch.full((width,), math.sqrt(dim / width), dtype=torch.float64)
        for path in site.norms:
            set_submodule(model, path, norm_with_weight(model.get_submodule(path), scale))
        config = model.config
        setattr(config, lay.eps_field, float(getattr(config, lay.eps_field)) * dim / width)
        setattr(config, lay.tie_field, False)
        setattr(config, lay.hidden_field, int(width))

    # --- registered per-layer format ----------------------------------------------------------------------------
    def resize_per_layer(self, model: nn.Module) -> None:
        lay = self.layout
        head_dim = self.head_dim(model)
        for layer, fields in per_layer_widths(model.config).items():
            if lay.intermediate_field in fields:
                keep = torch.arange(int(fields[lay.intermediate_field]))
                for name in (lay.gate, lay.up):
                    path = self._layer(layer, name)
                    module = model.get_submodule(path)
                    if module.out_features != keep.numel():
                        set_submodule(model, path, slice_linear_outputs(module, keep))
                path = self._layer(layer, lay.down)
                if model.get_submodule(path).in_features != keep.numel():
                    set_submodule(model, path, slice_linear_inputs(model.get_submodule(path), keep))
            if lay.heads_field in fields or lay.kv_heads_field in fields:
                # transformers drops a per-layer value equal to the global one, so either may be missing.
                heads = int(fields.get(lay.heads_field, _global(model.config, lay.heads_field)))
                groups = int(fields.get(lay.kv_heads_field, _global(model.config, lay.kv_heads_field)))
                if self.layer_heads(model, layer) != (heads, groups):
                    self._prune_heads(model, layer, HeadPlan(tuple(range(heads)), tuple(range(groups))), head_dim)
                attention = model.get_submodule(self._layer(layer, lay.attention))
                attention.num_key_value_groups = heads // groups


def _global(config, name: str):
    """A config's global value of a field that `per_layer_config` may also set per layer, read without transformers'
    warning about ambiguous global reads (the caller wants the global value: what the config validates, or the
    default of a layer that does not override it)."""
    read = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return read(name) if read is not None else getattr(config, name)


def grouped_head_counts(heads: int, groups: int) -> List[int]:
    """The query-head counts grouped-query attention can keep, ascending: g'·r' for g' ≤ `groups` whole key/value
    groups and r' ≤ heads / groups query heads from each (9 heads in 3 groups: 1, 2, 3, 4, 6, 9)."""
    return sorted({g * r for g in range(1, groups + 1) for r in range(1, heads // groups + 1)})


def allowed_factorizations(heads: int, groups: int, count: int) -> List[Tuple[int, int]]:
    """The ways (g', r') to keep `count` query heads of `heads` in `groups` key/value groups: g' whole groups with r'
    query heads from each (g'·r' = count), most groups first."""
    per_group = heads // groups
    return [(g, count // g) for g in range(groups, 0, -1) if count % g == 0 and count // g <= per_group]


def plan_heads(energies: Sequence[torch.Tensor], groups: int, count: int) -> List[HeadPlan]:
    """Choose `count` query heads in every layer (`energies`: one tensor of per-head output energies per layer, all
    with the same heads and `groups`), keeping the grouped-query layout: one factorisation (g', r') for all layers
    (`allowed_factorizations`), and per layer the r' strongest heads of each group and the g' groups whose kept heads
    are strongest.

    The factorisation maximises the kept share of each layer's energy, summed over layers, so every layer weighs the
    same; on a tie the one with more groups wins (more key/value heads, closer to the original). Ties between heads
    keep the lower index.
    """
    heads = int(energies[0].numel())
    options = allowed_factorizations(heads, groups, count)
    if not options:
        raise ValueError(
            f"{count} query heads cannot be kept from {heads} heads in {groups} key/value groups; the counts allowed "
            f"are {grouped_head_counts(heads, groups)}."
        )
    best: Optional[Tuple[float, List[HeadPlan]]] = None
    for kept_groups, per_group in options:
        score, plans = 0.0, []
        for energy in energies:
            by_group = energy.to(torch.float64).reshape(groups, heads // groups)
            values, order = torch.sort(by_group, dim=1, descending=True, stable=True)
            group_energy = values[:, :per_group].sum(dim=1)
            _, group_order = torch.sort(group_energy, descending=True, stable=True)
            chosen = sorted(group_order[:kept_groups].tolist())
            kept = sorted(g * (heads // groups) + int(h) for g in chosen for h in order[g, :per_group])
            total = float(energy.sum())
            score += float(group_energy[chosen].sum()) / total if total > 0 else 0.0
            plans.append(HeadPlan(tuple(kept), tuple(chosen)))
        if best is None or score > best[0] * (1 + 1e-12) + 1e-15:
            best = (score, plans)
    return best[1]


@register_adapter
class MistralAdapter(LlamaAdapter):
    """Mistral (`MistralForCausalLM`): Llama's layout; its config does not check `hidden_size % heads`."""

    model_types = ("mistral",)
    layout = replace(LlamaAdapter.layout, heads_divide_hidden=False)


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    """Qwen2 (`Qwen2ForCausalLM`): Llama's layout with biased q/k/v projections (sliced and folded with their rows);
    its config does not check `hidden_size % heads` and reads `head_dim` when given."""

    model_types = ("qwen2",)
    layout = replace(LlamaAdapter.layout, heads_divide_hidden=False)

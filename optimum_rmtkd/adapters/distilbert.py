"""DistilBERT (`DistilBertForSequenceClassification`): no token types; `pre_classifier` reads the stream.

| site        | config field | writers                                                                   | readers                                   |
|-------------|--------------|---------------------------------------------------------------------------|-------------------------------------------|
| hidden      | `dim`        | `distilbert.embeddings.*_embeddings`, `attention.out_lin`, `ffn.lin2`     | `attention.{q,k,v}_lin`, `ffn.lin1`, `pre_classifier` |
| layer i FFN | `hidden_dim` | `distilbert.transformer.layer.{i}.ffn.lin1`                               | `distilbert.transformer.layer.{i}.ffn.lin2` |
"""
from .base import register_adapter
from .transformer_encoder import EncoderLayout, TransformerEncoderAdapter


@register_adapter
class DistilBertAdapter(TransformerEncoderAdapter):
    model_types = ("distilbert",)
    layout = EncoderLayout(
        embeddings=("distilbert.embeddings.word_embeddings", "distilbert.embeddings.position_embeddings"),
        embeddings_norm="distilbert.embeddings.LayerNorm",
        layers="distilbert.transformer.layer",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attention_output="attention.out_lin",
        attention_norm="sa_layer_norm",
        ffn_input="ffn.lin1",
        ffn_output="ffn.lin2",
        output_norm="output_layer_norm",
        head_input="pre_classifier",
        head_output="classifier",
        hidden_field="dim",
        intermediate_field="hidden_dim",
        heads_field="n_heads",
        layers_field="n_layers",
    )

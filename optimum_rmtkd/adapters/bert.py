"""BERT (`BertForSequenceClassification`): the pooler's dense reads the residual stream, the classifier reads it.

| site        | config field        | writers                                                            | readers                              |
|-------------|---------------------|--------------------------------------------------------------------|--------------------------------------|
| hidden      | `hidden_size`       | `bert.embeddings.*_embeddings`, `attention.output.dense`, `output.dense` | `attention.self.{query,key,value}`, `intermediate.dense`, `bert.pooler.dense` |
| layer i FFN | `intermediate_size` | `bert.encoder.layer.{i}.intermediate.dense`                        | `bert.encoder.layer.{i}.output.dense` |
"""
from .base import register_adapter
from .transformer_encoder import EncoderLayout, TransformerEncoderAdapter


@register_adapter
class BertAdapter(TransformerEncoderAdapter):
    model_types = ("bert",)
    layout = EncoderLayout(
        embeddings=(
            "bert.embeddings.word_embeddings",
            "bert.embeddings.position_embeddings",
            "bert.embeddings.token_type_embeddings",
        ),
        embeddings_norm="bert.embeddings.LayerNorm",
        layers="bert.encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        attention_norm="attention.output.LayerNorm",
        ffn_input="intermediate.dense",
        ffn_output="output.dense",
        output_norm="output.LayerNorm",
        head_input="bert.pooler.dense",
        head_output="classifier",
        hidden_field="hidden_size",
        intermediate_field="intermediate_size",
        heads_field="num_attention_heads",
        layers_field="num_hidden_layers",
    )

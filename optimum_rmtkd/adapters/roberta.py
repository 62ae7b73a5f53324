"""RoBERTa (`RobertaForSequenceClassification`): no pooler; the classification head's dense reads the stream.

| site        | config field        | writers                                                               | readers                                 |
|-------------|---------------------|-----------------------------------------------------------------------|-----------------------------------------|
| hidden      | `hidden_size`       | `roberta.embeddings.*_embeddings`, `attention.output.dense`, `output.dense` | `attention.self.{query,key,value}`, `intermediate.dense`, `classifier.dense` |
| layer i FFN | `intermediate_size` | `roberta.encoder.layer.{i}.intermediate.dense`                        | `roberta.encoder.layer.{i}.output.dense` |
"""
from .base import register_adapter
from .transformer_encoder import EncoderLayout, TransformerEncoderAdapter


@register_adapter
class RobertaAdapter(TransformerEncoderAdapter):
    model_types = ("roberta",)
    layout = EncoderLayout(
        embeddings=(
            "roberta.embeddings.word_embeddings",
            "roberta.embeddings.position_embeddings",
            "roberta.embeddings.token_type_embeddings",
        ),
        embeddings_norm="roberta.embeddings.LayerNorm",
        layers="roberta.encoder.layer",
        query="attention.self.query",
        key="attention.self.key",
        value="attention.self.value",
        attention_output="attention.output.dense",
        attention_norm="attention.output.LayerNorm",
        ffn_input="intermediate.dense",
        ffn_output="output.dense",
        output_norm="output.LayerNorm",
        head_input="classifier.dense",
        head_output="classifier.out_proj",
        hidden_field="hidden_size",
        intermediate_field="intermediate_size",
        heads_field="num_attention_heads",
        layers_field="num_hidden_layers",
    )

# Stand-in: the sdist lacks tests/utils/; ConfigTester wants a non-default value for every field of PreTrainedConfig.
config_common_kwargs = {
    "architectures": ["BertModel"],
    "output_hidden_states": True,
    "output_attentions": True,
    "return_dict": False,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "id2label": {0: "label"},
    "label2id": {"label": 0},
    "problem_type": "regression",
}

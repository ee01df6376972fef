import pytest
import torch
from transformers import BertConfig, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from rayquant.workers.adapter import (
    UnsupportedArchitecture,
    build_skeleton,
    capture_block_inputs,
    check_decoder_architecture,
    embedding_stage_names,
    find_input_groups,
    find_layout,
    forward_block,
    materialize,
    materialize_embedding_stage,
)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


def test_skeleton_blocks_reproduce_the_real_model(llama):
    """embed → blocks → final hidden states through the adapter equal the model's own forward."""
    config = llama.config.to_dict()
    skeleton = build_skeleton(config, torch.float32)
    layout = find_layout(skeleton)
    assert layout.blocks_path == "model.layers" and layout.n_blocks == 3
    assert layout.head_names == ("lm_head.weight",)
    state = llama.state_dict()
    names = embedding_stage_names(skeleton, layout)
    assert set(names) == {"model.embed_tokens.weight", "model.norm.weight"}
    materialize_embedding_stage(skeleton, {n: state[n] for n in names}, torch.float32)

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    inp = capture_block_inputs(skeleton, layout, ids)
    for b in range(layout.n_blocks):
        prefix = layout.block_prefix(b)
        block = materialize(skeleton.model.layers[b], {k[len(prefix):]: v for k, v in state.items()
                                                        if k.startswith(prefix)}, torch.float32)
        inp = inp.advanced(forward_block(block, inp))
    with torch.no_grad():
        expected = llama.model(input_ids=ids).last_hidden_state
    assert torch.allclose(llama.model.norm(inp.hidden), expected, atol=1e-5)


def test_input_groups_come_from_shared_inputs_in_forward_order(llama):
    skeleton = build_skeleton(llama.config.to_dict(), torch.float32)
    layout = find_layout(skeleton)
    state = llama.state_dict()
    materialize_embedding_stage(skeleton, {n: state[n] for n in embedding_stage_names(skeleton, layout)},
                                torch.float32)
    inp = capture_block_inputs(skeleton, layout, torch.arange(16).reshape(1, 16))
    block = materialize(skeleton.model.layers[0], {k[len("model.layers.0."):]: v for k, v in state.items()
                                                    if k.startswith("model.layers.0.")}, torch.float32)
    groups = find_input_groups(block, inp)
    assert [g.linears for g in groups] == [
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ]
    assert [g.in_features for g in groups] == [64, 64, 64, 128]


def test_encoder_only_model_is_rejected_with_the_fix():
    config = BertConfig(architectures=["BertForMaskedLM"]).to_dict()
    with pytest.raises(UnsupportedArchitecture, match="decoder-only causal LMs"):
        check_decoder_architecture(config)
    with pytest.raises(UnsupportedArchitecture, match="unknown to this transformers"):
        check_decoder_architecture({"model_type": "no-such-model", "architectures": ["X"]})


def _adapter_hidden_states(model, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The last block's output through the adapter (skeleton + per-block kwargs) and the kwargs used."""
    skeleton = build_skeleton(model.config.to_dict(), torch.float32)
    layout = find_layout(skeleton)
    state = model.state_dict()
    materialize_embedding_stage(skeleton, {n: state[n] for n in embedding_stage_names(skeleton, layout)},
                                torch.float32)
    inp = capture_block_inputs(skeleton, layout, ids)
    for b in range(layout.n_blocks):
        prefix = layout.block_prefix(b)
        block = materialize(skeleton.get_submodule(layout.blocks_path)[b],
                            {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, torch.float32)
        inp = inp.advanced(forward_block(block, inp))
    return inp.hidden, list(inp.block_kwargs)


def test_per_layer_masks_and_rotary_of_gemma3_are_replayed_per_block():
    """Gemma 3 gives sliding and full layers their own mask and rotary base: each block gets its own."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=8,
                           layer_types=["sliding_attention", "full_attention"] * 2,
                           architectures=["Gemma3ForCausalLM"])
    model = Gemma3ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    hidden, block_kwargs = _adapter_hidden_states(model, ids)
    last = {}
    model.model.layers[-1].register_forward_hook(lambda _m, _a, out: last.setdefault("out", out))
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.allclose(hidden, last["out"], atol=1e-5)
    sliding, full = block_kwargs[0], block_kwargs[1]
    assert block_kwargs[2]["attention_mask"] is sliding["attention_mask"]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])


class _NeedsSegmentIds(LlamaDecoderLayer):
    """A block whose forward needs an argument the model's own forward never passes."""

    def forward(self, hidden_states, segment_ids, **kwargs):  # noqa: ANN001 - the signature is the test
        return super().forward(hidden_states, **kwargs)


def test_block_needing_an_argument_the_model_does_not_pass_is_rejected(llama):
    skeleton = build_skeleton(llama.config.to_dict(), torch.float32)
    layout = find_layout(skeleton)
    materialize_embedding_stage(skeleton, {"model.embed_tokens.weight": llama.model.embed_tokens.weight},
                                torch.float32)
    skeleton.model.layers[0] = _NeedsSegmentIds(llama.config, 0)
    with pytest.raises(UnsupportedArchitecture, match=r"requires \['segment_ids'\].*not supported"):
        capture_block_inputs(skeleton, layout, torch.arange(8).reshape(1, 8))


def test_model_without_a_list_of_its_decoder_blocks_is_rejected(llama):
    """A config whose num_hidden_layers matches no ModuleList of the model: no blocks to split."""
    skeleton = build_skeleton(llama.config.to_dict(), torch.float32)
    skeleton.config.num_hidden_layers = 5  # the model holds 3 blocks
    with pytest.raises(UnsupportedArchitecture, match="has no list of 5 decoder blocks; this architecture is not"):
        find_layout(skeleton)

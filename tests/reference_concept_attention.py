"""ConceptAttention's references, transcribed for the tests (helblazer811/ConceptAttention; read, not copied).

Flux: `concept_attention/flux/dit_block.py` (`ModifiedDoubleStreamBlock.forward`), `flux/dit.py` (the loop over the
double blocks, the concept stream's `txt_in` and `concept_vec`), `utils.embed_concepts` and
`flux/pipeline.compute_heatmaps_from_vectors`. SD3: `sd3/dit_block.py` (`CustomJointTransformerBlock.forward` and
`CustomJointAttnProcessor2_0`), `sd3/pipeline.encode_concepts` and `sd3/concept_attention_pipeline._compute_heatmaps`.

The weights are the diffusers modules' (BFL's `img_attn.qkv` is `to_q/to_k/to_v`, `txt_attn.proj` is `to_add_out`,
`txt_mod` is `norm1_context`'s linear, …); RoPE is diffusers' `apply_rotary_emb`, BFL's `apply_rope` in other
notation. The image and text streams run through the diffusers block itself (what the reference's block computes
for them), the concept stream and the maps as the references write them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb


def _rope(x, cos, sin):
    return apply_rotary_emb(x, (cos, sin), sequence_dim=2)


def _modulation(norm, vec):
    """BFL `Modulation(vec)`: Linear(silu(vec)) in six chunks, (shift, scale, gate) for the attention and the MLP."""
    return norm.linear(norm.silu(vec)).chunk(6, dim=1)


def flux_concept_maps(transformer, inputs: dict, concept_embeddings: torch.Tensor, layer_indices) -> torch.Tensor:
    """(B, K, N): `encode_image`'s heatmaps, before the resize, for the diffusers Flux `transformer` on `inputs` (the
    keyword arguments of its forward) and `concept_embeddings` (1, K, 4096), the first T5 token of each concept."""
    hidden = transformer.x_embedder(inputs["hidden_states"])
    timestep = inputs["timestep"].to(hidden.dtype) * 1000
    guidance = inputs.get("guidance")
    guidance = None if guidance is None else guidance.to(hidden.dtype) * 1000
    temb = (
        transformer.time_text_embed(timestep, inputs["pooled_projections"])
        if guidance is None
        else transformer.time_text_embed(timestep, guidance, inputs["pooled_projections"])
    )
    txt = transformer.context_embedder(inputs["encoder_hidden_states"])
    img_ids, txt_ids = inputs["img_ids"], inputs["txt_ids"]
    cos, sin = transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    concept_ids = torch.zeros(concept_embeddings.shape[1], 3, dtype=img_ids.dtype)  # `embed_concepts`
    concept_cos, concept_sin = transformer.pos_embed(torch.cat((concept_ids, img_ids), dim=0))
    concepts = transformer.context_embedder(concept_embeddings).expand(hidden.shape[0], -1, -1)  # `txt_in`
    vec = concept_vec = temb  # y = concept_vec = zeros: the same vector (`flux/dit.py`)
    img = hidden
    scores = []
    for block in transformer.transformer_blocks:
        heads = block.attn.heads
        img_mod = _modulation(block.norm1, vec)
        txt_mod = _modulation(block.norm1_context, vec)
        concept_mod = _modulation(block.norm1_context, concept_vec)
        ln = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)  # noqa: E731  BFL `*_norm1`: no affine, eps 1e-6

        def qkv(x, mod, q, k, v, norm_q, norm_k):
            x = (1 + mod[1][:, None]) * ln(x) + mod[0][:, None]
            q, k, v = (p(x).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (q, k, v))  # B L (H D) -> B H L D
            return norm_q(q), norm_k(k), v

        a = block.attn
        img_q, img_k, img_v = qkv(img, img_mod, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k)
        txt_q, txt_k, txt_v = qkv(
            txt, txt_mod, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.norm_added_q, a.norm_added_k
        )
        concept_q, concept_k, concept_v = qkv(
            concepts, concept_mod, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.norm_added_q, a.norm_added_k
        )
        # text-image joint attention
        text_image_q = _rope(torch.cat((txt_q, img_q), dim=2), cos, sin)
        text_image_k = _rope(torch.cat((txt_k, img_k), dim=2), cos, sin)
        text_image_attn = F.scaled_dot_product_attention(text_image_q, text_image_k, torch.cat((txt_v, img_v), dim=2))
        img_attn = text_image_attn[:, :, txt.shape[1] :]
        # concept-image joint attention
        concept_image_q = _rope(torch.cat((concept_q, img_q), dim=2), concept_cos, concept_sin)
        concept_image_k = _rope(torch.cat((concept_k, img_k), dim=2), concept_cos, concept_sin)
        concept_image_attn = F.scaled_dot_product_attention(
            concept_image_q, concept_image_k, torch.cat((concept_v, img_v), dim=2)
        )
        concept_attn = concept_image_attn[:, :, : concepts.shape[1]]
        concept_attn = concept_attn.transpose(1, 2).flatten(2)  # B H L D -> B L (H D)
        img_attn = img_attn.transpose(1, 2).flatten(2)
        scores.append(torch.einsum("bkd,bnd->bkn", concept_attn, img_attn))
        # the concept block update
        concepts = concepts + concept_mod[2][:, None] * a.to_add_out(concept_attn)
        concepts = concepts + concept_mod[5][:, None] * block.ff_context(
            (1 + concept_mod[4][:, None]) * ln(concepts) + concept_mod[3][:, None]
        )
        # the image and text streams: the block itself
        txt, img = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=(cos, sin))
    heatmaps = torch.stack(scores)  # (layers, B, K, N)
    heatmaps = torch.nn.functional.softmax(heatmaps, dim=-2)  # over the concepts
    return heatmaps[list(layer_indices)].mean(dim=0)


def flux_embed_concepts(t5, tokenizer, concepts, max_length) -> torch.Tensor:
    """`embed_concepts`: each concept through T5 alone (padded to `max_length`, no attention mask), its first token."""
    embeddings = []
    for concept in concepts:
        ids = tokenizer(concept, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        embeddings.append(t5(input_ids=ids.input_ids)[0][0, 0, :])
    return torch.stack(embeddings).unsqueeze(0)


def sd3_encode_concepts(clip_l, clip_g, tokenizer, concepts, width) -> torch.Tensor:
    """`encode_concepts`: the concepts joined into one prompt, both CLIPs' penultimate layers side by side, padded to
    T5's width, its first len(concepts) + 1 tokens (the start token, then one per concept)."""
    prompt = " ".join(concepts)
    ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    halves = [clip(ids, output_hidden_states=True).hidden_states[-2] for clip in (clip_l, clip_g)]
    embeds = torch.cat(halves, dim=-1)
    embeds = F.pad(embeds, (0, width - embeds.shape[-1]))
    return embeds[:, : len(concepts) + 1]


def sd3_concept_maps(transformer, inputs: dict, concept_hidden_states: torch.Tensor, layer_indices=None):
    """(B, K, N): `encode_image`'s heatmaps, before the resize, for the diffusers SD3 `transformer` on `inputs` and
    `concept_hidden_states` (1, 1 + K, width): the start token, then the concepts."""
    hidden = transformer.pos_embed(inputs["hidden_states"])
    temb = transformer.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
    encoder = transformer.context_embedder(inputs["encoder_hidden_states"])
    concept = transformer.context_embedder(concept_hidden_states).expand(hidden.shape[0], -1, -1)
    concept_vectors, image_vectors = [], []
    for block in transformer.transformer_blocks:
        attn = block.attn
        norm_hidden = block.norm1(hidden, emb=temb)[0]  # SD3.5's dual attention: its first output, the same
        if block.context_pre_only:
            norm_concept = block.norm1_context(concept, temb)
        else:
            norm_concept, c_gate_msa2, c_shift_mlp2, c_scale_mlp2, c_gate_mlp2 = block.norm1_context(concept, emb=temb)
        # `CustomJointAttnProcessor2_0` on (norm_hidden, norm_concept)
        batch_size = norm_hidden.shape[0]
        query, key, value = attn.to_q(norm_hidden), attn.to_k(norm_hidden), attn.to_v(norm_hidden)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        eq, ek, ev = (
            p(norm_concept).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out, encoder_out = out[:, : norm_hidden.shape[1]], out[:, norm_hidden.shape[1] :]
        concept_vectors.append(encoder_out.clone())
        image_vectors.append(out.clone())
        if not block.context_pre_only:
            concept_attn_output = attn.to_add_out(encoder_out)
            concept_attn_output = c_gate_msa2.unsqueeze(1) * concept_attn_output
            concept = concept + concept_attn_output
            norm_concept = block.norm2_context(concept)
            norm_concept = norm_concept * (1 + c_scale_mlp2[:, None]) + c_shift_mlp2[:, None]
            concept = concept + c_gate_mlp2.unsqueeze(1) * block.ff_context(norm_concept)
        encoder, hidden = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb)
    concept_vectors, image_vectors = torch.stack(concept_vectors), torch.stack(image_vectors)
    layer_indices = list(range(concept_vectors.shape[0])) if layer_indices is None else list(layer_indices)
    concept_vectors = concept_vectors[:, :, 1:]  # drop the padding token (first token)
    concept_vectors = concept_vectors / (concept_vectors.norm(dim=-1, keepdim=True) + 1e-8)
    heatmaps = torch.einsum("lbcd,lbpd->lbcp", concept_vectors.float(), image_vectors.float())
    heatmaps = torch.nn.functional.softmax(heatmaps, dim=-2)
    return heatmaps[layer_indices].mean(dim=0)

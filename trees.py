"""Tree verification (`--tree_budget N`, DESIGN.md section 4), in the spirit of DDTree: the target checks the
draft's N - 1 likeliest continuations in one forward and commits the path its own choices take."""
import torch

from draft import Draft
from model import Transformer
from sampling import Sampling, sample


def draft_tree(draft_logits, budget: int):
    """draft_logits [B, D, V] -> tokens, depths, parents [B, N], N <= budget, by depth: the root (node 0:
    depth 0, parent -1, token left to the caller) and the budget - 1 likeliest continuations, by beam."""
    B, D, V = draft_logits.shape
    width = budget - 1
    top_logp, top_tokens = torch.log_softmax(draft_logits.float(), dim=-1).topk(
        min(width, V), dim=-1)
    K = top_logp.shape[-1]
    scores, parents, tokens = [top_logp[:, 0]], [None], [top_tokens[:, 0]]
    for d in range(1, D):
        candidates = (scores[-1][:, :, None] + top_logp[:, d, None, :]).flatten(1)
        score, index = candidates.topk(min(width, candidates.shape[1]), dim=-1)
        scores.append(score)
        parents.append(index // K)
        tokens.append(top_tokens[:, d].gather(1, index % K))
    starts = [0]
    for score in scores:
        starts.append(starts[-1] + score.shape[1])
    C = starts[-1]
    device = draft_logits.device
    depth_of = torch.cat([torch.full((s.shape[1],), d + 1, device=device)
                          for d, s in enumerate(scores)])
    parent_of = torch.cat([torch.full((B, K), C, device=device)]
                          + [starts[d - 1] + p for d, p in enumerate(parents) if p is not None],
                          dim=1)  # [B, C]; parent C is the root
    # stable: at a tie a prefix (which comes first) still ranks above its extensions
    n = min(width, C)
    ranked = torch.sort(torch.cat(scores, dim=1), dim=-1, descending=True, stable=True).indices[:, :n]
    chosen = ranked.sort(dim=-1).values
    node_of = torch.zeros(B, C + 1, dtype=torch.long, device=device).scatter(
        1, chosen, torch.arange(1, n + 1, device=device).expand(B, -1))
    root = torch.zeros(B, 1, dtype=torch.long, device=device)
    return (torch.cat([root, torch.cat(tokens, dim=1).gather(1, chosen)], dim=1),
            torch.cat([root, depth_of[chosen]], dim=1),
            torch.cat([root - 1, node_of.gather(1, parent_of.gather(1, chosen))], dim=1))


def tree_step(target: Transformer, draft: Draft, anchor_token, anchor_pos, active, sampling: Sampling,
              block_size: int, budget: int):
    """One draft + tree-verify step on static shapes: the target checks the draft's best `budget`-node tree
    in one forward and walks its own choices. Arguments and returns as generate.speculative_step."""
    bs = block_size
    draft_logits = draft.block_logits(draft.noise_block(anchor_token, bs), anchor_pos)
    tokens, depth, parent = draft_tree(draft_logits, budget)
    tokens[:, 0] = anchor_token
    B, N = tokens.shape
    slots, visible = tree_layout(parent, anchor_pos, target.max_seq_length, bs - 1)
    logits, hidden = target(tokens, anchor_pos[:, None] + depth, capture=draft.args.target_layer_ids,
                            tree=(slots, visible, parent), invariant=target.batch_invariant)
    choice = sample(logits, sampling)[0]  # the target's token after each node
    is_parent = parent[:, None, :] == torch.arange(N, device=tokens.device)[:, None]
    chosen_child = is_parent & (tokens[:, None, :] == choice[:, :, None])
    has_child, child = chosen_child.any(-1), chosen_child.int().argmax(-1)
    node, path = tokens.new_zeros(B), []
    for _ in range(bs):
        path.append(node)
        node = torch.where(has_child.gather(1, node[:, None])[:, 0], child.gather(1, node[:, None])[:, 0],
                           node)
    path = torch.stack(path, dim=1)  # root, accepted nodes, the last repeated
    n_accepted = depth.gather(1, path[:, -1:])[:, 0]
    committed = choice.gather(1, path)
    positions = anchor_pos[:, None] + torch.arange(bs, device=tokens.device)
    target.move_cached(slots.gather(1, path), positions)
    target.keep_states(path[:, -1])  # recurrent layers: the state after the path's last node
    draft.write_context(hidden.gather(1, path[:, :, None, None].expand(-1, -1, *hidden.shape[2:])), positions)
    next_token = committed.gather(1, n_accepted[:, None])[:, 0]
    return (committed, n_accepted, torch.where(active, next_token, anchor_token),
            anchor_pos + (n_accepted + 1) * active)


def tree_layout(parent, anchor_pos, cache_length: int, max_depth: int):
    """parent [B, N] (draft_tree's) -> cache slots [B, N] = anchor_pos + node, and visible
    [B, N, cache_length]: the slots before the anchor, of the node's ancestors and its own."""
    B, N = parent.shape
    nodes = torch.arange(N, device=parent.device)
    ancestors = torch.eye(N, dtype=torch.bool, device=parent.device).expand(B, N, N)
    for _ in range(max_depth):
        ancestors = ancestors | ancestors.gather(1, parent.clamp(min=0)[:, :, None].expand(B, N, N))
    slots = anchor_pos[:, None] + nodes
    key_slots = torch.arange(cache_length, device=parent.device)
    in_tree = torch.zeros(B, N, cache_length, dtype=torch.bool, device=parent.device).scatter(
        2, slots[:, None, :].expand(B, N, N), ancestors)
    return slots, (key_slots < anchor_pos[:, None, None]) | in_tree

// Token-trie packer: framework-free C++17 (no Python, no torch).
//
// Packs a batch of token sequences into "packs". A pack is the token trie (prefix tree) of a
// contiguous run of the input sequences: every shared prefix is stored once, and the nodes are
// laid out in DFS pre-order, children in first-insertion order. Per pack (T nodes):
//
//   input_ids[i]    token of node i
//   position_ids[i] depth of node i (0 for a root) = its position in every sequence through it
//   parent[i]       packed index of the parent, -1 for a root (a pack can be a forest)
//   subtree_end[i]  one past the last packed index of i's subtree
//
// Because of the pre-order layout, node j is an ancestor-or-self of node i iff
// j <= i < subtree_end[j].
//
// Packing policy: sequences are taken in input order; a sequence joins the current pack if the
// pack's unique-node count after insertion stays <= token_budget (new nodes = length minus the
// longest prefix already in the trie); otherwise the current pack is closed and a new one starts
// with it. A sequence longer than token_budget thus gets a pack of its own (the only case where
// a pack exceeds the budget).
#pragma once

#include <cstdint>
#include <vector>

namespace flr {

struct Pack {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> position_ids;
  std::vector<int64_t> parent;
  std::vector<int64_t> subtree_end;
  int64_t seq_start = 0;  // the pack holds input sequences [seq_start, seq_end)
  int64_t seq_end = 0;
  int64_t num_total = 0;  // sum of the lengths of its sequences (tokens before sharing)
};

struct PackOutput {
  std::vector<Pack> packs;
  std::vector<int64_t> pack_of_seq;  // (S,) index of the pack holding each sequence
  std::vector<int64_t> node_index;   // (offsets[S],) packed index of each token within its pack
};

// Packs the S = num_seqs sequences tokens[offsets[s] : offsets[s + 1]].
// offsets has S + 1 entries, offsets[0] == 0, non-decreasing.
// Throws std::invalid_argument for token_budget < 1, malformed offsets or an empty sequence
// (the message names its index), std::length_error for >= 2^31 tokens in all.
PackOutput pack_sequences(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs,
                          int64_t token_budget);

}  // namespace flr

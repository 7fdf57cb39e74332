// Token-trie packer (see packer.h for the contract).
//
// Implementation notes
// * Nodes of the current pack are numbered in creation order (a parent is always created before
//   its children). Child lookup is one open-addressing hash table keyed by (parent, token) for
//   the whole trie, so wide nodes (roots, branch points with 100+ children) cost O(1).
// * Sequences that follow each other share long prefixes, so each insertion first compares
//   against the previous sequence of the same pack: the nodes of the common prefix are known
//   without any lookup; hash lookups start at the first differing token and stop at the first
//   miss, after which every remaining token is a new node.
// * When a pack closes: pre-order numbering by a stackless walk over first-child/next-sibling
//   links (no recursion; sequences can be very long), subtree sizes by one reverse pass over
//   creation order, then the arrays and the sequences' node indices are rewritten in pre-order.
#include "packer.h"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>

namespace flr {
namespace {

constexpr int32_t kNone = -1;

inline uint64_t edge_hash(int32_t parent, int64_t token) {
  uint64_t h = static_cast<uint64_t>(token) * 0x9E3779B97F4A7C15ULL;
  h ^= static_cast<uint64_t>(static_cast<uint32_t>(parent)) * 0xC2B2AE3D27D4EB4FULL;
  h ^= h >> 31;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 29;
  return h;
}

// (parent, token) -> child, linear probing, power-of-two capacity, load <= 1/2.
class EdgeTable {
 public:
  EdgeTable() { reset_capacity(1024); }

  int32_t find(int32_t parent, int64_t token) const {
    std::size_t i = edge_hash(parent, token) & mask_;
    while (true) {
      const Slot& s = slots_[i];
      if (s.child == kNone) return kNone;
      if (s.token == token && s.parent == parent) return s.child;
      i = (i + 1) & mask_;
    }
  }

  // Inserts a key known to be absent; slot_of[child] receives its slot (kept up to date on
  // growth) so that clear() costs O(size) rather than O(capacity).
  void insert(int32_t parent, int64_t token, int32_t child, std::vector<std::size_t>& slot_of) {
    if (2 * (size_ + 1) > slots_.size()) grow(slot_of);
    slot_of[static_cast<std::size_t>(child)] = place(parent, token, child);
    ++size_;
  }

  void clear(const std::vector<std::size_t>& slot_of, std::size_t num_nodes) {
    for (std::size_t v = 0; v < num_nodes; ++v) slots_[slot_of[v]].child = kNone;
    size_ = 0;
  }

  void reserve(std::size_t n) {
    std::size_t cap = slots_.size();
    while (cap < 2 * n) cap *= 2;
    if (cap != slots_.size() && size_ == 0) reset_capacity(cap);
  }

 private:
  struct Slot {
    int64_t token;
    int32_t parent;
    int32_t child;
  };

  std::size_t place(int32_t parent, int64_t token, int32_t child) {
    std::size_t i = edge_hash(parent, token) & mask_;
    while (slots_[i].child != kNone) i = (i + 1) & mask_;
    slots_[i] = Slot{token, parent, child};
    return i;
  }

  void grow(std::vector<std::size_t>& slot_of) {
    std::vector<Slot> old;
    old.swap(slots_);
    reset_capacity(old.size() * 2);
    for (const Slot& s : old) {
      if (s.child != kNone) {
        slot_of[static_cast<std::size_t>(s.child)] = place(s.parent, s.token, s.child);
      }
    }
  }

  void reset_capacity(std::size_t cap) {
    slots_.assign(cap, Slot{0, kNone, kNone});
    mask_ = cap - 1;
  }

  std::vector<Slot> slots_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

class Trie {
 public:
  std::size_t size() const { return token_.size(); }

  int32_t find(int32_t parent, int64_t token) const { return edges_.find(parent, token); }

  int32_t add(int32_t parent, int64_t token, int32_t depth) {
    const int32_t v = static_cast<int32_t>(token_.size());
    token_.push_back(token);
    parent_.push_back(parent);
    depth_.push_back(depth);
    first_child_.push_back(kNone);
    last_child_.push_back(kNone);
    next_sibling_.push_back(kNone);
    slot_of_.push_back(0);
    if (parent == kNone) {
      if (last_root_ == kNone) {
        first_root_ = v;
      } else {
        next_sibling_[static_cast<std::size_t>(last_root_)] = v;
      }
      last_root_ = v;
    } else {
      const auto p = static_cast<std::size_t>(parent);
      if (last_child_[p] == kNone) {
        first_child_[p] = v;
      } else {
        next_sibling_[static_cast<std::size_t>(last_child_[p])] = v;
      }
      last_child_[p] = v;
    }
    edges_.insert(parent, token, v, slot_of_);
    return v;
  }

  void clear() {
    edges_.clear(slot_of_, token_.size());
    token_.clear();
    parent_.clear();
    depth_.clear();
    first_child_.clear();
    last_child_.clear();
    next_sibling_.clear();
    slot_of_.clear();
    first_root_ = last_root_ = kNone;
  }

  void reserve(std::size_t n) {
    token_.reserve(n);
    parent_.reserve(n);
    depth_.reserve(n);
    first_child_.reserve(n);
    last_child_.reserve(n);
    next_sibling_.reserve(n);
    slot_of_.reserve(n);
    edges_.reserve(n);
  }

  // Writes the pack arrays in pre-order; pre[v] receives the packed index of node v.
  void emit(Pack& pack, std::vector<int64_t>& pre, std::vector<int64_t>& size) const {
    const std::size_t n = token_.size();
    pre.assign(n, 0);
    size.assign(n, 1);
    int64_t counter = 0;
    int32_t v = first_root_;
    while (v != kNone) {
      pre[static_cast<std::size_t>(v)] = counter++;
      const int32_t c = first_child_[static_cast<std::size_t>(v)];
      if (c != kNone) {
        v = c;
        continue;
      }
      while (v != kNone && next_sibling_[static_cast<std::size_t>(v)] == kNone) {
        v = parent_[static_cast<std::size_t>(v)];
      }
      if (v != kNone) v = next_sibling_[static_cast<std::size_t>(v)];
    }
    for (std::size_t u = n; u-- > 0;) {
      const int32_t p = parent_[u];
      if (p != kNone) size[static_cast<std::size_t>(p)] += size[u];
    }
    pack.input_ids.resize(n);
    pack.position_ids.resize(n);
    pack.parent.resize(n);
    pack.subtree_end.resize(n);
    for (std::size_t u = 0; u < n; ++u) {
      const auto i = static_cast<std::size_t>(pre[u]);
      const int32_t p = parent_[u];
      pack.input_ids[i] = token_[u];
      pack.position_ids[i] = depth_[u];
      pack.parent[i] = p == kNone ? -1 : pre[static_cast<std::size_t>(p)];
      pack.subtree_end[i] = pre[u] + size[u];
    }
  }

 private:
  std::vector<int64_t> token_;
  std::vector<int32_t> parent_;
  std::vector<int32_t> depth_;
  std::vector<int32_t> first_child_;
  std::vector<int32_t> last_child_;
  std::vector<int32_t> next_sibling_;
  std::vector<std::size_t> slot_of_;
  int32_t first_root_ = kNone;
  int32_t last_root_ = kNone;
  EdgeTable edges_;
};

}  // namespace

PackOutput pack_sequences(const int64_t* tokens, const int64_t* offsets, int64_t num_seqs,
                          int64_t token_budget) {
  if (token_budget < 1) {
    throw std::invalid_argument("token_budget must be >= 1, got " + std::to_string(token_budget));
  }
  if (num_seqs < 0) throw std::invalid_argument("num_seqs must be >= 0");
  PackOutput out;
  if (num_seqs == 0) return out;
  if (offsets[0] != 0) {
    throw std::invalid_argument("offsets[0] must be 0, got " + std::to_string(offsets[0]));
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (offsets[s + 1] < offsets[s]) {
      throw std::invalid_argument("offsets must be non-decreasing (offsets[" +
                                  std::to_string(s + 1) + "] < offsets[" + std::to_string(s) +
                                  "])");
    }
    if (offsets[s + 1] == offsets[s]) {
      throw std::invalid_argument("sequence " + std::to_string(s) +
                                  " is empty; every sequence needs at least one token");
    }
  }
  const int64_t total = offsets[num_seqs];
  if (total >= static_cast<int64_t>(std::numeric_limits<int32_t>::max())) {
    throw std::length_error("pack_sequences: 2^31 or more tokens in one batch is not supported");
  }

  out.pack_of_seq.resize(static_cast<std::size_t>(num_seqs));
  out.node_index.resize(static_cast<std::size_t>(total));
  int64_t* node = out.node_index.data();  // creation ids until the pack closes, then pre-order

  Trie trie;
  trie.reserve(static_cast<std::size_t>(std::min<int64_t>(token_budget, total)));
  std::vector<int64_t> pre, size;
  int64_t pack_start = 0;  // first sequence of the current pack
  int64_t pack_total = 0;

  auto close_pack = [&](int64_t seq_end) {
    Pack pack;
    pack.seq_start = pack_start;
    pack.seq_end = seq_end;
    pack.num_total = pack_total;
    trie.emit(pack, pre, size);
    for (int64_t k = offsets[pack_start]; k < offsets[seq_end]; ++k) {
      node[k] = pre[static_cast<std::size_t>(node[k])];
    }
    out.packs.push_back(std::move(pack));
    trie.clear();
  };

  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t begin = offsets[s];
    const int64_t len = offsets[s + 1] - begin;
    const int64_t* seq = tokens + begin;
    int64_t* seq_node = node + begin;

    // Longest prefix already in the trie: first the one shared with the previous sequence of
    // this pack (its nodes are known), then hash lookups until the first miss.
    int64_t matched = 0;
    int32_t cur = kNone;
    if (s > pack_start) {
      const int64_t pbegin = offsets[s - 1];
      const int64_t plen = begin - pbegin;
      const int64_t* prev = tokens + pbegin;
      const int64_t lim = len < plen ? len : plen;
      while (matched < lim && seq[matched] == prev[matched]) ++matched;
      if (matched > 0) {
        const int64_t* prev_node = node + pbegin;
        for (int64_t i = 0; i < matched; ++i) seq_node[i] = prev_node[i];
        cur = static_cast<int32_t>(prev_node[matched - 1]);
      }
    }
    while (matched < len) {
      const int32_t c = trie.find(cur, seq[matched]);
      if (c == kNone) break;
      seq_node[matched++] = c;
      cur = c;
    }

    if (s > pack_start &&
        static_cast<int64_t>(trie.size()) + (len - matched) > token_budget) {
      close_pack(s);
      pack_start = s;
      pack_total = 0;
      matched = 0;
      cur = kNone;
    }
    for (int64_t i = matched; i < len; ++i) {
      cur = trie.add(cur, seq[i], static_cast<int32_t>(i));
      seq_node[i] = cur;
    }
    pack_total += len;
    out.pack_of_seq[static_cast<std::size_t>(s)] = static_cast<int64_t>(out.packs.size());
  }
  close_pack(num_seqs);
  return out;
}

}  // namespace flr

/* A tiny tc object for the loader's tests: one pinned map of every kind the datapath uses
 * (hash, LPM trie, array, per-CPU hash, per-CPU array, LRU hash) and two tc programs that pass
 * every frame, so attach/replace can be tested without the real datapath.
 * pm_pass counts the frames it sees in `seen` (per-CPU array) at key 0, pm_pass_too at key 1, so a
 * test can tell which program runs, and that every frame met one of them while they were swapped. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct mini_lpm_key {
    __u32 prefixlen;
    __u32 ip;
};

struct mini_counter {
    __u64 packets;
    __u64 bytes;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 1024);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mini_hash SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, 64);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct mini_lpm_key);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mini_lpm SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mini_array SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, struct mini_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mini_percpu SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, struct mini_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} seen SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 64);
    __type(key, __u32);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mini_lru SEC(".maps");

static __always_inline int count(struct __sk_buff *skb, __u32 slot)
{
    struct mini_counter *c = bpf_map_lookup_elem(&seen, &slot);

    if (c) {
        c->packets += 1;
        c->bytes += skb->len;
    }
    return TC_ACT_OK;
}

SEC("tc")
int pm_pass(struct __sk_buff *skb)
{
    return count(skb, 0);
}

SEC("tc")
int pm_pass_too(struct __sk_buff *skb)
{
    return count(skb, 1);
}

char LICENSE[] SEC("license") = "GPL";

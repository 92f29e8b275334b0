/* portmesh eBPF datapath: map lookups and sending a frame on its way.
 * Included by datapath.bpf.c only, in order (each header uses the ones before it). */
#ifndef PM_LOOKUP_H
#define PM_LOOKUP_H

/* ---- lookups --------------------------------------------------------------------------------- */

static __always_inline __u32 network_kind(__be32 ip)
{
    struct pm_net_key key = { .prefixlen = 32, .ip = ip };
    __u32 *kind = bpf_map_lookup_elem(&networks, &key);

    return kind ? *kind : 0;
}

static __always_inline int is_public_ip(__be32 ip)
{
    return bpf_map_lookup_elem(&public_ips, &ip) != NULL;
}

/* Who holds (ip, port, proto): an exact mapping first, else the block the port falls in. *hit_mapping
 * says which, as only mappings have counters. */
static __always_inline struct pm_dest *find_dest(__be32 ip, __be16 port, __u8 proto, int *hit_mapping)
{
    struct pm_mapping_key mkey = { .ip = ip, .port = port, .proto = proto };
    struct pm_block_key bkey = { .prefixlen = 48, .ip = ip, .port = port };
    struct pm_dest *dest = bpf_map_lookup_elem(&mappings, &mkey);

    *hit_mapping = dest != NULL;
    if (dest)
        return dest;
    return bpf_map_lookup_elem(&blocks, &bkey);
}

static __always_inline void count_mapping(struct __sk_buff *skb, __be32 ip, __be16 port, __u8 proto)
{
    struct pm_mapping_key key = { .ip = ip, .port = port, .proto = proto };
    struct pm_counter *c = bpf_map_lookup_elem(&mapping_stats, &key);

    /* The agent creates the entry with the mapping: a missing one is not ours to make. */
    if (c) {
        c->packets++;
        c->bytes += skb->len;
    }
}

/* ---- sending ---------------------------------------------------------------------------------- */

/* Hand the frame to dest: into a local container, or into the tunnel device to its host.
 * A local container gets it by bpf_redirect_peer (every program here runs at tc ingress): straight
 * to its eth0's ingress, skipping the host end's egress and the veth's backlog queue (see
 * tests/ebpf/test_program_bench.py; -DPM_NO_REDIRECT_PEER builds the plain bpf_redirect variant). */
static __always_inline int send_to(struct __sk_buff *skb, struct pm_dest *dest, struct pm_config *cfg)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u32 ifindex = dest->ifindex;

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    mac_copy(eth->h_dest, dest->mac);
    mac_copy(eth->h_source, cfg->gateway_mac);
    if (PM_USE_PEER && (dest->flags & PM_DEST_LOCAL))
        return bpf_redirect_peer(ifindex, 0);
    return bpf_redirect(ifindex, 0);
}

/* Send the frame back out of the port it came in, MACs swapped (answers built in place). */
static __always_inline int send_back(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u8 tmp[6];

    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    mac_copy(tmp, eth->h_dest);
    mac_copy(eth->h_dest, eth->h_source);
    mac_copy(eth->h_source, tmp);
    return bpf_redirect(skb->ifindex, 0);
}

#endif

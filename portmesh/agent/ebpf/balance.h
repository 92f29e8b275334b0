/* portmesh eBPF datapath: mappings that are more than a rewrite (issue 15, docs/pipeline.md POLICY,
 * BALANCE, AFFINITY): the firewall per mapping, then the backend per connection.
 * Included by datapath.bpf.c after lookup.h and answers.h, before deliver.h. */
#ifndef PM_BALANCE_H
#define PM_BALANCE_H

/* ---- firewall ----------------------------------------------------------------------------------- */

/* The longest policy network holding the source decides (the compiler wrote an allow inside a deny
 * as a deny, so deny always wins); none: open, unless the mapping has an allow list. */
static __always_inline int policy_permits(struct pm_mapping_key *mkey, __u32 version, __u16 flags, __be32 src)
{
    struct pm_policy_key key = { .prefixlen = 96 + 32, .mapping = *mkey, .version = version, .src = src };
    __u32 *action = bpf_map_lookup_elem(&policy, &key);

    if (action)
        return *action == PM_POLICY_ALLOW;
    return !(flags & PM_DEST_ALLOWLIST);
}

static __always_inline void count_denied(struct __sk_buff *skb, struct pm_mapping_key *mkey)
{
    struct pm_counter *c = bpf_map_lookup_elem(&mapping_denied, mkey);

    if (c) {
        c->packets++;
        c->bytes += skb->len;
    }
}

/* ---- backend choice ----------------------------------------------------------------------------- */

/* murmur3's finaliser: every input bit moves every output bit. */
static __always_inline __u32 pm_mix(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

/* Rendezvous (HRW) hashing over the n weight-expanded slots: the slot whose (connection, slot) hash is
 * highest. Adding a slot moves only the connections it wins; removing one only its own. */
static __always_inline __u32 hrw_slot(struct pkt *p, __u32 n)
{
    __u32 basis = pm_mix(p->ip->saddr ^ pm_mix(p->ip->daddr ^ pm_mix(((__u32)p->sport << 16 | p->dport) ^
                                                                      pm_mix(p->ip->protocol + 1))));
    __u32 best = 0, best_score = 0, i;

    for (i = 0; i < PM_MAX_SLOTS; i++) {
        __u32 score;

        if (i >= n)
            break;
        score = pm_mix(basis + (i + 1) * 0x9e3779b9);
        if (i == 0 || score > best_score) {
            best = i;
            best_score = score;
        }
    }
    return best;
}

/* A TCP segment without ACK opens a connection: it is always balanced afresh, so a client port
 * reused right after a refused attempt never follows that attempt's (perhaps since down) backend. */
static __always_inline int opens_connection(struct __sk_buff *skb, struct pkt *p)
{
    struct tcphdr *tcp = p->l4;

    if (p->ip->protocol != IPPROTO_TCP || (void *)(tcp + 1) > (void *)(long)skb->data_end)
        return 0;
    return !tcp->ack;
}

/* The connection's backend: the one `affinity` remembers while it is still a serving backend of the
 * mapping (so a connection never moves while its backend stays, whatever happens to the others),
 * else chosen by HRW and remembered. */
static __always_inline struct pm_dest *choose_backend(struct __sk_buff *skb, struct pkt *p, struct pm_mapping_key *mkey,
                                                     __u32 version, __u32 n)
{
    struct pm_affinity_key akey = { .saddr = p->ip->saddr, .daddr = p->ip->daddr, .sport = p->sport,
                                    .dport = p->dport, .proto = p->ip->protocol };
    struct pm_slot_key skey = { .mapping = *mkey, .version = version };
    struct pm_dest *dest;

    if (n > 1 && !opens_connection(skb, p)) {
        struct pm_dest *pinned = bpf_map_lookup_elem(&affinity, &akey);

        if (pinned) {
            struct pm_backend_key bkey = { .mapping = *mkey };

            mac_copy(bkey.mac, pinned->mac);
            dest = bpf_map_lookup_elem(&backends, &bkey);
            if (dest && (dest->flags & PM_DEST_SERVING))
                return dest;
        }
    }
    skey.slot = n > 1 ? hrw_slot(p, n) : 0;
    dest = bpf_map_lookup_elem(&slots, &skey);
    if (dest && n > 1)
        bpf_map_update_elem(&affinity, &akey, dest, BPF_ANY);
    return dest;
}

/* A mapping whose entry is PM_DEST_BALANCED: refused with no serving backend (as an unmapped port),
 * then its firewall (a denied packet is dropped without an answer: a reset would tell a scanner the
 * port is served and let spoofed sources aim resets at others), then the connection's backend. */
static __always_inline int deliver_balanced(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg,
                                            struct pm_dest *entry)
{
    struct pm_mapping_key mkey = { .ip = p->ip->daddr, .port = p->dport, .proto = p->ip->protocol };
    __u32 n = entry->ifindex, version = entry->owner;
    __u16 flags = entry->flags;
    struct pm_dest *dest;

    if (n == 0 || n > PM_MAX_SLOTS) {
        return refuse(skb, p);
    }
    if ((flags & PM_DEST_FILTERED) && !policy_permits(&mkey, version, flags, p->ip->saddr)) {
        count_denied(skb, &mkey);
        return TC_ACT_SHOT;
    }
    dest = choose_backend(skb, p, &mkey, version, n);
    if (!dest)
        return count_drop(skb, PM_DROP_NO_ROUTE); /* the slots of this version are not (or no longer) there */
    count_mapping(skb, mkey.ip, mkey.port, mkey.proto);
    return send_to(skb, dest, cfg);
}

/* May a container (port) send from a balanced-entry mapping's port: it is one of its backends. */
static __always_inline int backend_owns(struct pm_mapping_key *mkey, struct pm_port *port)
{
    struct pm_backend_key bkey = { .mapping = *mkey };
    struct pm_dest *dest;

    mac_copy(bkey.mac, port->mac);
    dest = bpf_map_lookup_elem(&backends, &bkey);
    return dest && dest->owner == port->owner;
}

#endif

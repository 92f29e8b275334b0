/* portmesh eBPF datapath: delivery by mapping, shared by the programs that take frames for the pools.
 * Included by datapath.bpf.c only, in order (each header uses the ones before it). */
#ifndef PM_DELIVER_H
#define PM_DELIVER_H

/* ---- delivery by mapping (all three programs) ---------------------------------------------------- */

static __always_inline int is_icmp_error(__u8 type)
{
    return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED;
}

/* The IP header an ICMP error quotes (plain 20 bytes, with the 8 bytes after it), or NULL. */
static __always_inline struct iphdr *quoted_ip(struct __sk_buff *skb, struct pkt *p)
{
    struct iphdr *q = p->l4 + sizeof(struct icmphdr);

    if ((void *)(q + 1) + 8 > (void *)(long)skb->data_end || q->ihl != 5)
        return NULL;
    return q;
}

static __always_inline struct pm_dest *find_echo(__be32 public_ip, __be32 remote, __be16 id)
{
    struct pm_echo_key key = { .public_ip = public_ip, .remote = remote, .id = id };

    return bpf_map_lookup_elem(&echo, &key);
}

/* Who sent the packet an ICMP error quotes: the holder of its source (address, port), or for a
 * quoted echo request whoever sent it. The quoted source must be the address the error is for. */
static __always_inline struct pm_dest *quoted_sender(struct __sk_buff *skb, struct pkt *p)
{
    struct iphdr *q = quoted_ip(skb, p);
    __be16 *ports;
    int hit_mapping;

    if (!q || q->saddr != p->ip->daddr)
        return NULL;
    ports = (void *)(q + 1);
    if (q->protocol == IPPROTO_TCP || q->protocol == IPPROTO_UDP) {
        struct pm_dest *dest = find_dest(q->saddr, ports[0], q->protocol, &hit_mapping);

        /* A balanced mapping's packet was sent by the backend its connection was given. */
        if (dest && hit_mapping && (dest->flags & PM_DEST_BALANCED)) {
            struct pm_affinity_key akey = { .saddr = q->daddr, .daddr = q->saddr, .sport = ports[1],
                                            .dport = ports[0], .proto = q->protocol };

            return bpf_map_lookup_elem(&affinity, &akey);
        }
        return dest;
    }
    if (q->protocol == IPPROTO_ICMP && ((struct icmphdr *)ports)->type == ICMP_ECHO)
        return find_echo(q->saddr, q->daddr, ((struct icmphdr *)ports)->un.echo.id);
    return NULL;
}

/* An ICMP echo reply or error for a public IP: to whoever sent the request (echo map) or the packet
 * the error quotes (mappings, then blocks: PMTU discovery and refusals reach the container). */
static __always_inline int deliver_icmp(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    struct icmphdr *icmp = icmp_of(skb, p);
    struct pm_dest *dest = NULL;

    if (icmp && icmp->type == ICMP_ECHOREPLY)
        dest = find_echo(p->ip->daddr, p->ip->saddr, icmp->un.echo.id);
    else if (icmp && is_icmp_error(icmp->type))
        dest = quoted_sender(skb, p);
    if (!dest)
        return count_drop(skb, PM_DROP_ICMP);
    return send_to(skb, dest, cfg);
}

/* A frame for an address of a public pool: to the mapping's or block's holder, else refused the way
 * a closed port refuses (RST / port unreachable) -- promptly, not by silence. Echo requests to a
 * public IP in use are answered here. */
static __always_inline int deliver_pool(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    __u8 proto = p->ip->protocol;
    struct pm_dest *dest;
    int hit_mapping;

    if (proto == IPPROTO_ICMP) {
        struct icmphdr *icmp = icmp_of(skb, p);

        if (icmp && icmp->type == ICMP_ECHO)
            return is_public_ip(p->ip->daddr) ? answer_echo(skb, p) : count_drop(skb, PM_DROP_ICMP);
        return deliver_icmp(skb, p, cfg);
    }
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return count_drop(skb, PM_DROP_REFUSED);
    dest = find_dest(p->ip->daddr, p->dport, proto, &hit_mapping);
    if (dest) {
        if (hit_mapping && (dest->flags & PM_DEST_BALANCED))
            return deliver_balanced(skb, p, cfg, dest);
        if (hit_mapping)
            count_mapping(skb, p->ip->daddr, p->dport, proto);
        return send_to(skb, dest, cfg);
    }
    return refuse(skb, p);
}

#endif

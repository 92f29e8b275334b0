/* portmesh eBPF datapath: the outside world: the gateway's fib lookup, or the tunnel to the gateway.
 * Included by datapath.bpf.c only, in order (each header uses the ones before it). */
#ifndef PM_ROUTE_H
#define PM_ROUTE_H

/* ---- the outside world ------------------------------------------------------------------------- */

/* A router's hop, as the host's own forwarding would count it (ip_decrease_ttl). */
static __always_inline void decrease_ttl(struct __sk_buff *skb)
{
    struct iphdr *ip = (void *)(long)skb->data + sizeof(struct ethhdr);

    if ((void *)(ip + 1) > (void *)(long)skb->data_end)
        return;
    ip->check = csum_replace16(ip->check, bpf_htons(ip->ttl << 8), bpf_htons((ip->ttl - 1) << 8));
    ip->ttl--;
}

/* True unless ``skb`` is a GSO packet whose segments (gso_size plus the IP and TCP/UDP headers) are
 * larger than ``mtu``, the MTU of the device the fib lookup chose. */
static __always_inline int segment_fits(struct __sk_buff *skb, struct pkt *p, __u32 mtu)
{
    __u32 headers = p->ip->ihl * 4;

    if (!skb->gso_size || !mtu)
        return 1;
    if (p->ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = p->l4;

        if ((void *)(tcp + 1) > (void *)(long)skb->data_end)
            return 0;
        headers += tcp->doff * 4;
    } else {
        headers += sizeof(struct udphdr);
    }
    return skb->gso_size + headers <= mtu;
}

/* A gateway host sends a container's frame out by its own routing, as the host would forward it
 * (ip_forward): a local destination (the host itself) is fenced, containers never reach the host's
 * sockets; no route: dropped; then, answered from the gateway address as the host kernel answers on
 * an OVS gateway: TTL <= 1 with ICMP time exceeded, a DF packet the next hop cannot carry with ICMP
 * fragmentation needed (a GSO packet by its segments, as the kernel checks it). Too big without DF
 * is dropped (NO_ROUTE): nothing fragments here. */
static __always_inline int route_out(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    struct bpf_fib_lookup fib = {};
    struct ethhdr *eth;
    void *data_end;
    __u32 mtu = 0;
    long rc;

    fib.family = AF_INET;
    fib.tos = p->ip->tos;
    fib.l4_protocol = p->ip->protocol;
    fib.sport = p->sport;
    fib.dport = p->dport;
    /* tot_len only for a plain packet: given a GSO packet's IP length, a 64 KB TSO packet from a
     * container would be FRAG_NEEDED and bulk uploads stall; with tot_len 0 the helper checks a GSO
     * skb not at all (it passes whatever its segment size): segment_fits() checks those. With
     * tot_len the helper compares with the route's MTU (learnt path MTUs included), as the kernel. */
    fib.tot_len = skb->gso_size ? 0 : bpf_ntohs(p->ip->tot_len);
    fib.ipv4_src = p->ip->saddr;
    fib.ipv4_dst = p->ip->daddr;
    fib.ifindex = skb->ifindex;
    rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_NOT_FWDED || rc == BPF_FIB_LKUP_RET_BLACKHOLE ||
        rc == BPF_FIB_LKUP_RET_UNREACHABLE || rc == BPF_FIB_LKUP_RET_PROHIBIT)
        return count_drop(skb, rc == BPF_FIB_LKUP_RET_NOT_FWDED ? PM_DROP_FENCE : PM_DROP_NO_ROUTE);
    if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
        mtu = fib.mtu_result;
    else if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
        return count_drop(skb, PM_DROP_NO_ROUTE);
    else if (fib.ifindex == skb->ifindex)
        return count_drop(skb, PM_DROP_NO_ROUTE); /* never back into the port it came from */
    else if (rc == BPF_FIB_LKUP_RET_SUCCESS && !segment_fits(skb, p, fib.mtu_result))
        mtu = fib.mtu_result; /* a TSO packet whose segments the next hop cannot carry */
    if (p->ip->ttl <= 1)
        return answer_icmp_error(skb, p, PM_DROP_TTL_EXCEEDED, ICMP_TIME_EXCEEDED, ICMP_EXC_TTL, 0,
                                 cfg->gateway_ip);
    if (mtu) {
        /* Never sent on to be cut where the container learns nothing; without DF the host would
         * fragment, which this program does not. */
        if (!(p->ip->frag_off & bpf_htons(IP_DF)))
            return count_drop(skb, PM_DROP_NO_ROUTE);
        return answer_icmp_error(skb, p, PM_DROP_TOO_BIG, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED,
                                 bpf_htonl(mtu & 0xffff), cfg->gateway_ip);
    }
    decrease_ttl(skb);
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return bpf_redirect_neigh(fib.ifindex, 0, 0, 0); /* the kernel resolves the next hop */
    eth = (void *)(long)skb->data;
    data_end = (void *)(long)skb->data_end;
    if ((void *)(eth + 1) > data_end)
        return TC_ACT_SHOT;
    mac_copy(eth->h_dest, fib.dmac);
    mac_copy(eth->h_source, fib.smac);
    return bpf_redirect(fib.ifindex, 0);
}

/* To the outside world: by this host's routing on a gateway, else through the tunnel to the gateway. */
static __always_inline int send_outside(struct __sk_buff *skb, struct pkt *p, struct pm_config *cfg)
{
    struct ethhdr *eth = p->eth;

    if (cfg->flags & PM_CFG_GATEWAY)
        return route_out(skb, p, cfg);
    if (!cfg->gateway_tunnel)
        return count_drop(skb, PM_DROP_NO_ROUTE);
    mac_copy(eth->h_dest, cfg->gateway_mac);
    return bpf_redirect(cfg->gateway_tunnel, 0);
}

#endif

/* portmesh eBPF datapath: the maps' layout, shared by datapath.bpf.c and layout.py.
 *
 * layout.py mirrors every struct here field for field (ctypes); a test compares
 * the sizes with the BTF of the compiled object, so the two cannot drift apart.
 * Addresses and ports are in network byte order (as they sit in the packet);
 * everything else is host order. All maps are pinned by name under the agent's
 * bpffs directory, so an agent restart reuses them and traffic keeps flowing.
 */
#ifndef PORTMESH_DATAPATH_H
#define PORTMESH_DATAPATH_H

#include <linux/types.h>
#include <linux/bpf.h> /* struct bpf_spin_lock */

#define PM_MAX_PORTS 65536      /* container ports per host */
#define PM_MAX_MAPPINGS 262144
#define PM_MAX_BLOCKS 65536
#define PM_MAX_MACS 131072
#define PM_MAX_NETWORKS 1024
#define PM_MAX_PUBLIC_IPS 65536
#define PM_MAX_ECHO 16384

/* config (ARRAY, one entry, key 0): what the whole host's program needs to know. */
#define PM_CFG_GATEWAY 1 /* this host is a gateway: outside traffic leaves by its own routing (fib) */
struct pm_config {
    __u8 gateway_mac[6];   /* the containers' next hop (answers ARP for gateway_ip) */
    __u8 virtual_mac[6];   /* ARP answer for every public IP */
    __be32 gateway_ip;     /* 169.254.1.1 */
    __u32 gateway_tunnel;  /* compute host: ifindex of the tunnel device to its gateway host; 0 otherwise */
    __u32 flags;           /* PM_CFG_* */
};

/* ports (HASH, key __u32 ifindex of a container port's host end). */
struct pm_port {
    __u8 mac[6];  /* the container's MAC: the only source MAC the port may send */
    __u16 pad;
    __u32 owner;  /* owner id = this ifindex: what pm_dest.owner names */
};

/* owned_ips (HASH, key struct pm_owned_ip, value __u8 1): the IPs a port may send from. */
struct pm_owned_ip {
    __u32 ifindex;
    __be32 ip;
};

/* Where a frame goes: value of mappings, blocks and macs. */
#define PM_DEST_LOCAL 1   /* ifindex is a container port on this host */
#define PM_DEST_TUNNEL 2  /* ifindex is the tunnel device to the container's host */
struct pm_dest {
    __u8 mac[6];    /* the destination container's MAC (eth_dst is set to it) */
    __u16 flags;    /* PM_DEST_* */
    __u32 ifindex;  /* where the frame leaves */
    __u32 owner;    /* local owner id (its port's ifindex) or 0 for a container on another host */
};

/* mappings (HASH pm_mapping_key -> pm_dest): (public ip, proto, port) -> container, exact. */
struct pm_mapping_key {
    __be32 ip;
    __be16 port;
    __u8 proto;  /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 pad;
};

/* blocks (LPM_TRIE pm_block_key -> pm_dest): a container's aligned ephemeral block on each of its
 * IPs, for TCP and UDP alike. prefixlen = 32 + (16 - log2(block size)). */
struct pm_block_key {
    __u32 prefixlen;
    __be32 ip;
    __be16 port;
    __u16 pad;  /* never part of the prefix */
};

/* macs (HASH pm_mac_key -> pm_dest): L2 table, every container MAC of the cloud (local or remote). */
struct pm_mac_key {
    __u8 mac[6];
    __u16 pad;
};

/* networks (LPM_TRIE pm_net_key -> __u32 kind): how a destination address is treated. */
#define PM_NET_POOL 1       /* a public pool: mapped, or refused */
#define PM_NET_PROTECTED 2  /* management / underlay: never reached from a container */
#define PM_NET_LINK_LOCAL 3 /* 169.254.0.0/16: only the gateway address itself */
struct pm_net_key {
    __u32 prefixlen;
    __be32 ip;
};

/* public_ips (HASH __be32 -> __u32 1): the public IPs in use; ARP and ICMP echo are answered for them. */

/* mapping_stats (PERCPU_HASH pm_mapping_key -> pm_counter): packets/bytes delivered through a mapping;
 * the agent creates the entry with the mapping, the program only adds. */
struct pm_counter {
    __u64 packets;
    __u64 bytes;
};

/* drops (PERCPU_ARRAY __u32 reason -> pm_counter). */
enum pm_drop_reason {
    PM_DROP_UNKNOWN_PORT = 0, /* frame from a port the maps do not know */
    PM_DROP_SPOOF_MAC = 1,
    PM_DROP_SPOOF_IP = 2,
    PM_DROP_SPOOF_PORT = 3,   /* TCP/UDP from a source port the container does not own */
    PM_DROP_SPOOF_ARP = 4,
    PM_DROP_FENCE = 5,        /* to a protected or link-local network, or to the host itself */
    PM_DROP_NOT_IP = 6,       /* neither IPv4 nor ARP */
    PM_DROP_TUNNEL = 7,       /* from a tunnel, for no local container and not for this gateway */
    PM_DROP_ICMP = 8,         /* ICMP type a container may not send / nobody to deliver to */
    PM_DROP_REFUSED = 9,      /* unmapped port on a public IP: answered with RST / port unreachable */
    PM_DROP_NO_ROUTE = 10,    /* fib lookup found no way out; or too big without DF (nothing fragments) */
    PM_DROP_TTL_EXCEEDED = 11, /* TTL <= 1 at the gateway hop: answered with ICMP time exceeded */
    PM_DROP_TOO_BIG = 12,     /* DF and larger than the next hop's MTU: answered with fragmentation needed */
    PM_DROP_ICMP_LIMIT = 13,  /* would be answered with an ICMP error, but over the rate limit: silent */
    PM_DROP_MAX = 14,
};

/* echo (LRU_HASH pm_echo_key -> pm_dest): a container's ICMP echo requests, so the reply finds it. */
struct pm_echo_key {
    __be32 public_ip;  /* the container's address the request left from */
    __be32 remote;     /* the address it pinged */
    __be16 id;         /* the echo identifier */
    __u16 pad;
};

/* ---- mappings that are more than a rewrite (issue 15): balanced, filtered, health-checked ---- */
#define PM_MAX_SLOTS 64             /* slots per mapping (weight-expanded backends), as OVS multipath's HRW */
#define PM_MAX_SLOT_ENTRIES 131072
#define PM_MAX_BACKENDS 65536
#define PM_MAX_POLICY 65536
#define PM_MAX_AFFINITY 262144

/* A mappings entry with PM_DEST_BALANCED is not a destination: the backend comes from `slots`.
 * Its ifindex holds the slot count (0: no serving backend, refused as an unmapped port) and its
 * owner the version of its slots and policy entries (a hash of their content: a change writes the
 * new version's entries, flips this entry, then deletes the old ones -- atomic per host); mac unused.
 * Every mapping with several backends, a firewall policy, or its one backend down has such an
 * entry (a single serving backend then has one slot). */
#define PM_DEST_BALANCED 4
#define PM_DEST_FILTERED 8   /* check `policy` before delivery */
#define PM_DEST_ALLOWLIST 16 /* the mapping has an allow list: a source no policy entry matches is denied */
#define PM_DEST_SERVING 32   /* in `backends`: this backend takes new connections */

/* slots (HASH pm_slot_key -> pm_dest): the mapping's serving backends, weight-expanded. */
struct pm_slot_key {
    struct pm_mapping_key mapping;
    __u32 version;
    __u32 slot;
};

/* backends (HASH pm_backend_key -> pm_dest): every backend of a balanced-entry mapping, serving or
 * not (flags | PM_DEST_SERVING): who may send from the mapped port, and whether a connection
 * remembered in `affinity` may stay on its backend. */
struct pm_backend_key {
    struct pm_mapping_key mapping;
    __u8 mac[6];
    __u16 pad;
};

/* policy (LPM_TRIE pm_policy_key -> __u32 PM_POLICY_*): the mapping's source networks, prefixlen =
 * 96 + the network's length. One trie, resolved when compiled: an allow network inside (or equal
 * to) a deny network is written as a deny, so the longest match is always the answer. */
#define PM_POLICY_ALLOW 1
#define PM_POLICY_DENY 2
struct pm_policy_key {
    __u32 prefixlen;
    struct pm_mapping_key mapping;
    __u32 version;
    __be32 src;
};

/* affinity (LRU_HASH pm_affinity_key -> pm_dest): the backend each connection of a balanced mapping
 * was sent to, written by the program. */
struct pm_affinity_key {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad[3];
};

/* mapping_denied (PERCPU_HASH pm_mapping_key -> pm_counter): packets/bytes a filtered mapping's
 * policy dropped; created by the agent with the mapping, like mapping_stats. */

/* icmp_limit (ARRAY, one entry, key 0): the token bucket every ICMP error built here draws from
 * (port unreachable, time exceeded, fragmentation needed; not echo replies, not TCP resets), as
 * Linux's icmp_msgs_per_sec / icmp_msgs_burst (defaults 1000 and 50). Global, not per CPU: the limit
 * holds whatever CPU a sender's frames land on. Compile-time constants (the agent does not fill them). */
#define PM_ICMP_RATE 1000 /* errors per second */
#define PM_ICMP_BURST 50
struct pm_icmp_limit {
    struct bpf_spin_lock lock;
    __u32 tokens;  /* errors that may be sent now (<= PM_ICMP_BURST) */
    __u64 stamp;   /* bpf_ktime_get_ns() the tokens were counted up to; 0: never used (a full bucket) */
};

#endif

/* portmesh eBPF datapath: the maps, declared once (layout in datapath.h), pinned by name.
 * Included by datapath.bpf.c only, in order (each header uses the ones before it). */
#ifndef PM_MAPS_H
#define PM_MAPS_H

/* ---- maps ---------------------------------------------------------------------------------- */

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct pm_config);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_PORTS);
    __type(key, __u32);
    __type(value, struct pm_port);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} ports SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_PUBLIC_IPS);
    __type(key, struct pm_owned_ip);
    __type(value, __u8);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} owned_ips SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_MAPPINGS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mapping_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mappings SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, PM_MAX_BLOCKS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_block_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} blocks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_MACS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mac_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} macs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, PM_MAX_NETWORKS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_net_key);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} networks SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_PUBLIC_IPS);
    __type(key, __be32);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} public_ips SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, PM_MAX_MAPPINGS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mapping_key);
    __type(value, struct pm_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mapping_stats SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, PM_DROP_MAX);
    __type(key, __u32);
    __type(value, struct pm_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} drops SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, PM_MAX_ECHO);
    __type(key, struct pm_echo_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} echo SEC(".maps");

/* Balanced / filtered mappings (balance.h). */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_SLOT_ENTRIES);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_slot_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} slots SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, PM_MAX_BACKENDS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_backend_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} backends SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, PM_MAX_POLICY);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_policy_key);
    __type(value, __u32);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, PM_MAX_AFFINITY);
    __type(key, struct pm_affinity_key);
    __type(value, struct pm_dest);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} affinity SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_HASH);
    __uint(max_entries, PM_MAX_MAPPINGS);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, struct pm_mapping_key);
    __type(value, struct pm_counter);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} mapping_denied SEC(".maps");

/* The ICMP errors' token bucket (answers.h). */
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct pm_icmp_limit);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} icmp_limit SEC(".maps");

#endif

"""Rank groups: a worker instance of world size N is N processes (torch.distributed).

Rank 0 leads: it alone talks NATS and schedules; every step it broadcasts the step's work
to the other ranks (`channel`), and they report their KV moves back through the
rendezvous store (`reports`). `process_group` joins a group (env:// rendezvous, as
`torchrun` sets it up); `launch` starts the other ranks of a group on this host;
`follower` is a non-leader rank's loop; `leader_group` is the leader's view of its ranks
for KV hand-offs.
"""

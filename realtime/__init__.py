"""The realtime core: protocol, hub, connections, brokers and presence. Imports nothing from
`api` or `persistence`; `realtime.storage` states what it needs from them."""

# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_chatd_global_optspecs
    string join \n h/help V/version
end

function __fish_chatd_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_chatd_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_chatd_using_subcommand
    set -l cmd (__fish_chatd_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c chatd -n "__fish_chatd_needs_command" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_needs_command" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "serve" -d 'Run one chat node (WebSocket on /ws/chat, REST on /api/chat, chat page on /, dashboard on /dashboard)'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "message-service" -d 'Run the MessageService over gRPC (memory or Redis backend)'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "connect" -d 'Chat from the terminal: interactive for a person, JSON lines for scripts'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "send" -d 'Send one message (or --count N), wait for the server\'s ack, exit non-zero on error'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "presence" -d 'Where users are online: nodes, devices, last heartbeat (reads Redis)'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "stats" -d 'The cluster at a glance: nodes, sessions, users, message counters, broker lag'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "store" -d 'The Redis store\'s upkeep: `migrate` moves it to the current key layout'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "crossnode-test" -d 'Run the seed\'s cross-node scenarios against two nodes; non-zero exit on any failure'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "bench" -d 'Measure a node: messages per second, latency, memory per connection'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "token" -d 'Print a token (HS256 JWT) for a user, signed with the configured [auth] secret'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "completions" -d 'Print shell completions'
complete -c chatd -n "__fish_chatd_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c chatd -n "__fish_chatd_using_subcommand serve" -l profile -d 'Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)' -r
complete -c chatd -n "__fish_chatd_using_subcommand serve" -l config -d 'A config file read over the profile' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand serve" -l config-dir -d 'Directory of default.toml and the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand serve" -l port -d 'Port to listen on (overrides every config layer; 0 picks a free port)' -r
complete -c chatd -n "__fish_chatd_using_subcommand serve" -l node-id -d 'Node id (overrides every config layer)' -r
complete -c chatd -n "__fish_chatd_using_subcommand serve" -l print-config -d 'Print the effective configuration (secrets redacted) and exit'
complete -c chatd -n "__fish_chatd_using_subcommand serve" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand serve" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l listen -d 'Address to listen on (20882 is the seed\'s Dubbo port)' -r
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l backend -d 'Where messages are kept' -r -f -a "memory\t'In this process: gone when it stops'
redis\t'In Redis ([redis] of the config, or --redis): survives restarts of this service'"
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l redis -d 'Redis URL, e.g. redis://:redis123@127.0.0.1:6379/0 (default: from the config)' -r
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l profile -d 'Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)' -r
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l config -d 'A config file read over the profile' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l config-dir -d 'Directory of default.toml and the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -l redis-cluster -d 'The --redis URL (one or more, comma-separated) names seed nodes of a Redis Cluster'
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c chatd -n "__fish_chatd_using_subcommand message-service" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l user -d 'Your user id' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l url -d 'The node to connect to; give several to fail over: each reconnect tries the next' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l token -d 'A token for nodes in auth mode token (see `chatd token`)' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l chat -d 'Chat id for messages you send (default: the two user ids, sorted, joined by _)' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l linger -d 'After stdin ends and every send is acknowledged, keep printing received frames this many seconds before closing' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l state-dir -d 'Where the last seq seen is kept, one file per user (`{user}.cursor`) [default: $XDG_STATE_HOME/chatd or ~/.local/state/chatd]' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l since -d 'Replay the inbox after this seq on connecting, instead of after the saved cursor (0: the whole inbox)' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l ack-timeout -d 'After stdin ends, give up on sends still not acknowledged after this many seconds (exit status 1)' -r
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l json -d 'Raw JSON frames in on stdin, one JSON line out per received frame (the default when stdin is not a terminal)'
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l interactive -d 'The human mode (`@bob hello`, `/read ID`, ...) even when stdin is not a terminal'
complete -c chatd -n "__fish_chatd_using_subcommand connect" -l no-reconnect -d 'Exit when the connection ends instead of reconnecting'
complete -c chatd -n "__fish_chatd_using_subcommand connect" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand connect" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand send" -l from -d 'Sender user id' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l to -d 'Receiver user id' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l group -d 'A group to send to instead (its id is the chat\'s); the sender must be a member' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l chat -d 'Chat id (default: the two user ids, sorted, joined by _)' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l count -d 'How many messages to send (each gets " #i" appended when more than one)' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l url -d 'The node to connect to' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l token -d 'A token for nodes in auth mode token (see `chatd token`)' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l timeout -d 'Seconds to wait for the connection and for each ack' -r
complete -c chatd -n "__fish_chatd_using_subcommand send" -l json -d 'One JSON line per ack instead of text'
complete -c chatd -n "__fish_chatd_using_subcommand send" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand send" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand presence" -l redis -d 'Redis URL, e.g. redis://:redis123@127.0.0.1:6379/0 (default: from the config)' -r
complete -c chatd -n "__fish_chatd_using_subcommand presence" -l profile -d 'Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)' -r
complete -c chatd -n "__fish_chatd_using_subcommand presence" -l config -d 'A config file read over the profile' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand presence" -l config-dir -d 'Directory of default.toml and the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand presence" -l redis-cluster -d 'The --redis URL (one or more, comma-separated) names seed nodes of a Redis Cluster'
complete -c chatd -n "__fish_chatd_using_subcommand presence" -l json -d 'Machine output'
complete -c chatd -n "__fish_chatd_using_subcommand presence" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand presence" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l node -d 'A node\'s URL (repeatable; default: every node holding a lease in Redis)' -r
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l redis -d 'Redis URL, e.g. redis://:redis123@127.0.0.1:6379/0 (default: from the config)' -r
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l profile -d 'Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)' -r
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l config -d 'A config file read over the profile' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l config-dir -d 'Directory of default.toml and the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l redis-cluster -d 'The --redis URL (one or more, comma-separated) names seed nodes of a Redis Cluster'
complete -c chatd -n "__fish_chatd_using_subcommand stats" -l json -d 'Machine output'
complete -c chatd -n "__fish_chatd_using_subcommand stats" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand stats" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand store; and not __fish_seen_subcommand_from migrate help" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand store; and not __fish_seen_subcommand_from migrate help" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand store; and not __fish_seen_subcommand_from migrate help" -f -a "migrate" -d 'Move a Redis store\'s keys from the layout before Redis Cluster support to the current one (stop every node and MessageService first); safe to run again'
complete -c chatd -n "__fish_chatd_using_subcommand store; and not __fish_seen_subcommand_from migrate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -l redis -d 'Redis URL, e.g. redis://:redis123@127.0.0.1:6379/0 (default: from the config)' -r
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -l profile -d 'Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)' -r
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -l config -d 'A config file read over the profile' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -l config-dir -d 'Directory of default.toml and the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -l redis-cluster -d 'The --redis URL (one or more, comma-separated) names seed nodes of a Redis Cluster'
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -l json -d 'Machine output'
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from migrate" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from help" -f -a "migrate" -d 'Move a Redis store\'s keys from the layout before Redis Cluster support to the current one (stop every node and MessageService first); safe to run again'
complete -c chatd -n "__fish_chatd_using_subcommand store; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -l node -d 'The two nodes (default: the node1 and node2 profiles on this machine)' -r
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -l profile -d 'Where Redis (to check presence directly) and the token secret (for nodes in auth mode token) are read from: this profile' -r
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -l config-dir -d 'Directory of the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -l spawn -d 'Start two nodes (profiles node1 and node2 on free ports) and stop them afterwards'
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -l json -d 'Machine output: one JSON object with every check'
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand crossnode-test" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l url -d 'The node to measure (ignored with --spawn)' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l pairs -d 'Sender/receiver pairs, each on its own connections' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l messages -d 'Messages each sender sends' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l window -d 'Messages a sender has in flight before it waits for acks' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l idle -d 'Idle connections to open for the memory figure (with --spawn)' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l node -d 'With --cluster: take these two running nodes (senders on the first, receivers on the second) instead of starting two; their CPU time is then not measured' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l rate -d 'With --cluster: offer this many messages a second in all (open loop, latency measured from when each message was due); without it, each sender keeps --window in flight' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l group -d 'With --cluster: one sender (on node A) writes to a group of this many members (the sender among them), the others alternately on node B and node A; CPU and Redis figures are then per delivery (one message to one member)' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l duration -d 'With --cluster: seconds of sending' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l profile -d 'With --cluster: the profile whose services (Redis, broker, MessageService) the nodes use' -r
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l config-dir -d 'Directory of the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l services-dir -d 'With --cluster: where scripts/services.sh keeps its pid files, for the CPU time of Redis, the broker and the MessageService' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l spawn -d 'Start a node of this binary for the run (in-memory backends, no rate limit) and measure its memory too'
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l cluster -d 'Measure the cross-node path instead: start two nodes (profile node1 settings, node ids benchA and benchB) on the services of scripts/services.sh, senders on the first, receivers on the second'
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l heartbeats -d 'With --cluster: measure heartbeats instead of messages: --pairs devices on node A each send HEARTBEAT (--rate in all a second, default 5000) and wait for the answer'
complete -c chatd -n "__fish_chatd_using_subcommand bench" -l json -d 'Machine output'
complete -c chatd -n "__fish_chatd_using_subcommand bench" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand bench" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand token" -l user -d 'The user the token names (its `sub`)' -r
complete -c chatd -n "__fish_chatd_using_subcommand token" -l ttl -d 'How long the token is valid: 90s, 15m, 1h, 7d' -r
complete -c chatd -n "__fish_chatd_using_subcommand token" -l profile -d 'Profile: reads <config-dir>/<PROFILE>.toml over default.toml (node1: 9430, node2: 9431)' -r
complete -c chatd -n "__fish_chatd_using_subcommand token" -l config -d 'A config file read over the profile' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand token" -l config-dir -d 'Directory of default.toml and the profiles' -r -F
complete -c chatd -n "__fish_chatd_using_subcommand token" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand token" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand completions" -s h -l help -d 'Print help'
complete -c chatd -n "__fish_chatd_using_subcommand completions" -s V -l version -d 'Print version'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "serve" -d 'Run one chat node (WebSocket on /ws/chat, REST on /api/chat, chat page on /, dashboard on /dashboard)'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "message-service" -d 'Run the MessageService over gRPC (memory or Redis backend)'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "connect" -d 'Chat from the terminal: interactive for a person, JSON lines for scripts'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "send" -d 'Send one message (or --count N), wait for the server\'s ack, exit non-zero on error'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "presence" -d 'Where users are online: nodes, devices, last heartbeat (reads Redis)'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "stats" -d 'The cluster at a glance: nodes, sessions, users, message counters, broker lag'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "store" -d 'The Redis store\'s upkeep: `migrate` moves it to the current key layout'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "crossnode-test" -d 'Run the seed\'s cross-node scenarios against two nodes; non-zero exit on any failure'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "bench" -d 'Measure a node: messages per second, latency, memory per connection'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "token" -d 'Print a token (HS256 JWT) for a user, signed with the configured [auth] secret'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "completions" -d 'Print shell completions'
complete -c chatd -n "__fish_chatd_using_subcommand help; and not __fish_seen_subcommand_from serve message-service connect send presence stats store crossnode-test bench token completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c chatd -n "__fish_chatd_using_subcommand help; and __fish_seen_subcommand_from store" -f -a "migrate" -d 'Move a Redis store\'s keys from the layout before Redis Cluster support to the current one (stop every node and MessageService first); safe to run again'

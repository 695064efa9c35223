"""The egress broker: the only way out of a sandbox's network namespace, on the host's terms.

- ``rules``: allow/deny matching, IP literal normalization, private-address refusal;
- ``proxy``: HTTP CONNECT / absolute-URI and SOCKS5 over any byte stream, SNI check, byte and
  connection caps, one event per connection attempt;
- ``server``: per sandbox, a Unix socket the jail mounts at /run/stockade/broker.sock (the agent bridges
  127.0.0.1:3128 and :1080 to it inside), and the JSONL event log.
"""

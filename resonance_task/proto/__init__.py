"""Code generated from the wire contract in the checkout's proto/ (tools/gen_proto.py)."""

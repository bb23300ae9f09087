#!/usr/bin/env python3
"""Read a Meridian region's events straight from NATS JetStream with nats-py.

Every committed event of region R is in the JetStream stream `meridian-events-R`, on
the subject `meridian.events.R.<aggregate_type>.<aggregate_id>` (a `.` in the id is
written `%2E`), with `Nats-Msg-Id` = the event id. The message body is the event as
JSON: region, position, event_id, aggregate_type, aggregate_id, version, type,
payload, metadata, recorded_at. Headers repeat the routing fields
(Meridian-Region, Meridian-Aggregate-Type, Meridian-Aggregate-Id, Meridian-Version,
Meridian-Event-Type, Meridian-Position).

A durable consumer keeps its place on the server, so a restarted reader resumes
where it acknowledged. Events of other regions are in their own streams; read them
in their region, or from `meridian-from-<other>` (this region's copy).

    pip install nats-py
    python3 consume.py --url nats://127.0.0.1:4222 --region east --durable my-app

Prints one JSON line per event; with --count N it exits after N events.
"""

import argparse
import asyncio
import json
import sys
from urllib.parse import unquote, urlsplit

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


def connect_options(url: str) -> dict:
    """nats.connect's arguments for a URL that may carry a user and password
    (nats://reader:<password>@host:4222) or a token (nats://<token>@host:4222).
    nats-py sends them as written in the URL, percent-encoding and all."""
    parts = urlsplit(url)
    if not parts.username:
        return {"servers": [url]}
    server = f"{parts.scheme}://{parts.hostname}:{parts.port or 4222}"
    if parts.password is None:
        return {"servers": [server], "token": unquote(parts.username)}
    return {"servers": [server], "user": unquote(parts.username), "password": unquote(parts.password)}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="nats://127.0.0.1:4222", help="the region's NATS")
    parser.add_argument("--region", required=True, help="the region whose events to read")
    parser.add_argument("--durable", default="example-consumer", help="consumer name (its place is kept)")
    parser.add_argument("--aggregate-type", help="only this aggregate type")
    parser.add_argument("--count", type=int, default=0, help="exit after this many events (0: run forever)")
    parser.add_argument("--timeout", type=float, default=30.0, help="with --count: give up after this many seconds")
    args = parser.parse_args()

    nc = await nats.connect(**connect_options(args.url))
    js = nc.jetstream()
    subject = f"meridian.events.{args.region}.{args.aggregate_type or '*'}.*"
    sub = await js.pull_subscribe(
        subject,
        durable=args.durable,
        stream=f"meridian-events-{args.region}",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
    )
    seen = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    try:
        while args.count == 0 or seen < args.count:
            if args.count and loop.time() > deadline:
                print(f"only {seen} of {args.count} events within {args.timeout}s", file=sys.stderr)
                return 1
            try:
                messages = await sub.fetch(batch=100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                event = json.loads(msg.data)
                print(json.dumps(event), flush=True)
                # Acknowledge after handling: an unacknowledged event comes again.
                await msg.ack()
                seen += 1
                if args.count and seen >= args.count:
                    break
    finally:
        await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

#!/usr/bin/env python3
"""One libtorrent session in its own process, driven by ``run.py`` (JSON lines on stdin/stdout).

Settings: libtorrent's defaults (``preset=default``) or its ``high_performance_seed`` preset
(``preset=hps``), then for both: listen on 127.0.0.1 only, DHT / LSD / UPnP / NAT-PMP off, uTP off
(TCP only), protocol encryption disabled, ``allow_multiple_connections_per_ip`` on. Peers are
connected directly with ``connect_peer``.

Commands: ``start`` (preset) -> port; ``seed`` (torrent, save_path) adds a torrent in seed mode;
``fetch`` (torrent, save_path, peers [port], optional ``at``) adds a torrent, connects the peers and
answers once it is finished (t0, t1, seconds); ``status`` -> payload bytes uploaded; ``quit``.
Every answer carries ``rss_peak_kib``.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import libtorrent as lt


def reply(**kw) -> None:
    kw["rss_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def settings(preset: str) -> dict:
    s = lt.default_settings()
    if preset == "hps":
        s.update(lt.high_performance_seed())
    s.update(
        {
            "listen_interfaces": "127.0.0.1:0",
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "in_enc_policy": int(lt.enc_policy.disabled),
            "out_enc_policy": int(lt.enc_policy.disabled),
            "allow_multiple_connections_per_ip": True,
            "alert_mask": int(
                lt.alert.category_t.status_notification | lt.alert.category_t.error_notification
            ),
        }
    )
    return s


def main() -> None:
    ses = None
    handles = []
    for line in sys.stdin:
        cmd = json.loads(line)
        c = cmd["cmd"]
        try:
            if c == "start":
                ses = lt.session(settings(cmd.get("preset", "default")))
                for _ in range(200):
                    if ses.listen_port():
                        break
                    time.sleep(0.01)
                reply(ok=True, port=ses.listen_port())
            elif c == "seed":
                atp = lt.add_torrent_params()
                atp.ti = lt.torrent_info(cmd["torrent"])
                atp.save_path = cmd["save_path"]
                atp.flags |= lt.torrent_flags.seed_mode
                handles.append(ses.add_torrent(atp))
                reply(ok=True)
            elif c == "fetch":
                at = cmd.get("at")
                if at:
                    time.sleep(max(0.0, at - time.time()))
                ti = lt.torrent_info(cmd["torrent"])
                t0 = time.time()
                atp = lt.add_torrent_params()
                atp.ti = ti
                atp.save_path = cmd["save_path"]
                h = ses.add_torrent(atp)
                handles.append(h)
                for port in cmd.get("peers", ()):
                    h.connect_peer(("127.0.0.1", port))
                done = False
                while not done:
                    ses.wait_for_alert(100)
                    for a in ses.pop_alerts():
                        if isinstance(a, lt.torrent_finished_alert) and a.handle == h:
                            done = True
                    if not done and h.status().is_finished:
                        done = True
                t1 = time.time()
                reply(ok=True, t0=t0, t1=t1, seconds=t1 - t0, bytes_down=h.status().total_payload_download)
            elif c == "status":
                up = sum(h.status().total_payload_upload for h in handles)
                reply(ok=True, bytes_up=up)
            elif c == "quit":
                reply(ok=True)
                break
            else:
                reply(ok=False, error=f"unknown command {c}")
        except Exception as e:
            reply(ok=False, error=repr(e))


if __name__ == "__main__":
    main()

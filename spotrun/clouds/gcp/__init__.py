"""GCP: Compute Engine Spot VMs (provider), GCS store, metadata `preempted` notice, price refresh.

What the registry (`spotrun.clouds`) reads; nothing here imports a Google library.
"""

PROVIDER = "provider:GCPProvider"
STORE_SCHEME = "gs"
STORE = "store:GCSStore"
NOTICE = "notice:GCPNotice"
PRICES = "prices:refresh_offers"
SECRETS = "secrets:GCPSecrets"

"""Azure: Spot VMs through ARM (provider), Blob store, Scheduled Events notice, price refresh.

What the registry (`spotrun.clouds`) reads; nothing here imports an Azure library.
"""

PROVIDER = "provider:AzureProvider"
STORE_SCHEME = "az"
STORE = "store:AzureBlobStore"
NOTICE = "notice:AzureNotice"
PRICES = "prices:refresh_offers"
SECRETS = "secrets:AzureSecrets"

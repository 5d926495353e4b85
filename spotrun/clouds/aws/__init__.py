"""AWS: EC2 spot instances (provider, api, resources), S3 store, IMDSv2 notice, price refresh.

What the registry (`spotrun.clouds`) reads; nothing here imports boto3.
"""

PROVIDER = "provider:AWSProvider"
STORE_SCHEME = "s3"
STORE = "store:S3Store"
NOTICE = "notice:AWSNotice"
PRICES = "prices:refresh_offers"
SECRETS = "secrets:AWSSecrets"

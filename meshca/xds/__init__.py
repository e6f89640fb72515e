"""The xDS protocol engine (state of the world and delta, any resource type), caller
authentication, secret names, the Unix-socket front door and stream stats. SDS
(``meshca.sds``) and ADS (``meshca.xds.ads``) are its users."""

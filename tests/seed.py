"""Constants of the seed document (x509-csr-workflow.txt) shared by the tests that replay its openssl steps."""

# Seed step 1: $unique = "dev001"; $registrationId = "$unique-skittlesorter"
REGISTRATION_ID = "dev001-skittlesorter"

# Seed step 2, intermediate-ext.cnf
INTERMEDIATE_EXT = """[ v3_intermediate ]
basicConstraints = critical,CA:true,pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always,issuer
"""

# Seed step 6, device-ext.cnf
DEVICE_EXT = f"""[ v3_req ]
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectAltName = DNS:{REGISTRATION_ID}
authorityKeyIdentifier = keyid:always,issuer
"""

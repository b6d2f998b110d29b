// The S3 server the operator's backup tests write to: gofakes3 behind a check of every
// request's AWS Signature Version 4, made with the AWS SDK's own signer.
module raftkv.io/e2e/s3server

go 1.26.0

require (
	github.com/aws/aws-sdk-go-v2 v1.48.0
	github.com/johannesboyne/gofakes3 v1.2.0
)

require (
	github.com/aws/smithy-go v1.28.9 // indirect
	github.com/ryszard/goskiplist v0.0.0-20150312221310-2dfbae5fcf46 // indirect
	go.shabbyrobe.org/gocovmerge v0.0.0-20230507111327-fa4f82cfbf4d // indirect
	golang.org/x/tools v0.8.0 // indirect
)
